"""PRIME (Cui et al. 2025): outcome rewards plus implicit process rewards from an online implicit PRM.

Per rollout (``num_generations`` samples per prompt):

1. outcome rewards r_o(y) in [0, 1] from the reward functions (a verifier);
2. implicit process rewards r_t = beta * log(pi_prm(y_t | y_<t) / pi_ref(y_t | y_<t)), from the
   PRM before this rollout's update (PRIME's single forward pass);
3. the PRM takes one step on the cross-entropy between sigma(sum_t r_t) and r_o(y);
4. advantages: leave-one-out (RLOO) baselines for both rewards, the process-reward return plus
   the outcome advantage (eq. 5, ``objectives.prime_advantages``);
5. ``num_ppo_epochs`` passes of PPO's clipped policy loss over minibatches; no value model and
   no KL penalty (Table 1 of the sparsity paper: PRIME has none).

The PRM and the reference start as copies of the policy at the start of training (PRIME
initialises both from the SFT model the policy starts from). docs/train.md lists what is
simplified against the paper's recipe.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from rlsparse.errors import UsageError
from rlsparse.train.objectives import clipped_policy_loss, implicit_process_rewards, prime_advantages, prm_loss
from rlsparse.train.onpolicy import OnPolicyConfig, OnPolicyTrainer, token_logprobs


@dataclass
class PRIMEConfig(OnPolicyConfig):
    """``OnPolicyConfig`` plus PRIME's implicit-PRM options (defaults from the PRIME paper).

    Example:
        >>> PRIMEConfig(output_dir="out", per_device_train_batch_size=8, num_generations=4)
    """

    num_generations: int = field(default=4, metadata={"help": "Samples per prompt (RLOO needs >= 2)."})
    num_ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout."})
    prm_beta: float = field(default=0.05, metadata={"help": "beta of the implicit process reward."})
    prm_learning_rate: float = field(default=1e-6, metadata={"help": "Learning rate of the implicit PRM."})
    gamma: float = field(default=1.0, metadata={"help": "Discount of the process-reward return."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError("PRIME's leave-one-out advantages need num_generations >= 2")


class PRIMETrainer(OnPolicyTrainer):
    """PRIME with an online implicit PRM; accepts any ``TrainerCallback`` (``MaskCallback`` included).

    Args are those of ``PPOTrainer`` (without a value model), plus ``prm_model`` (default: a
    trainable copy of ``model`` at the start).

    Example:
        >>> trainer = PRIMETrainer(model, PRIMEConfig(output_dir="out"), ds, tok, reward_funcs=[exact_answer])
        >>> trainer.train()
    """

    algorithm = "prime"

    def __init__(self, model, args: PRIMEConfig, train_dataset, processing_class, reward_funcs, callbacks=None,
                 ref_model=None, prm_model=None):
        super().__init__(model, args, train_dataset, processing_class, reward_funcs, callbacks, ref_model)
        self.prm, self.prm_optimizer = self._helper((prm_model or copy.deepcopy(self.model)).requires_grad_(True),
                                                      args.prm_learning_rate)

    def _score_rollout(self, model, batch: dict, rows: list[dict]) -> None:
        args, mask = self.args, batch["mask"]
        ids, attention, n = batch["input_ids"], batch["attention_mask"], mask.shape[1]
        outcomes = self._scores(batch, rows)
        if bool(((outcomes < 0) | (outcomes > 1)).any()):
            raise UsageError(f"prime: outcome rewards must lie in [0, 1] (the implicit PRM learns them as labels); "
                             f"got {outcomes.min().item():g}..{outcomes.max().item():g}; use a 0/1 verifier reward")
        with self._autocast():
            logprobs = token_logprobs(model, ids, attention, n, args.temperature)
            ref = token_logprobs(self.ref_model, ids, attention, n)
        self.prm.train()
        with torch.enable_grad(), self._autocast():
            process = implicit_process_rewards(token_logprobs(self.prm, ids, attention, n), ref, mask, args.prm_beta)
            loss = prm_loss(process, mask, outcomes)
        self.prm_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.prm.parameters(), args.max_grad_norm)
        self.prm_optimizer.step()
        process = process.detach()
        batch.update(old_logprobs=logprobs,
                     advantages=prime_advantages(process, mask, outcomes, args.num_generations, args.gamma))
        self._log("prm/loss", loss.item())
        self._log("prm/process_reward", (process.sum(dim=1)).mean().item())
        self._log("completion_length", mask.sum(dim=1).mean().item())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n = inputs["mask"].shape[1]
        logprobs = token_logprobs(model, inputs["input_ids"], inputs["attention_mask"], n, self.args.temperature)
        loss, clip_fraction = clipped_policy_loss(logprobs, inputs["old_logprobs"], inputs["advantages"],
                                                  inputs["mask"], self.args.epsilon)
        self._log("policy/clip_fraction", clip_fraction.item())
        return loss
