"""PPO for causal LMs as a ``transformers.Trainer``: learned value model, GAE, KL penalty, clipping.

The textbook algorithm (Schulman et al. 2017) as used for LLMs (Ziegler et al. 2019, Ouyang et
al. 2022): per rollout, sample completions, score them, fold a per-token KL penalty to the frozen
reference into the reward, estimate advantages with GAE from a learned value model, whiten them,
then take ``num_ppo_epochs`` passes of clipped policy and value updates over minibatches.

The value model is a separate copy of the policy's transformer with a linear head on its last
hidden state, not a head on the policy's own trunk: a shared trunk would let the value loss move
the policy's weights, and the policy's weights are what this toolkit measures (and what
``MaskCallback`` confines). It has its own optimizer (the policy's kind, ``args.optim``, without weight decay); it is not saved
with the policy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from rlsparse.train.objectives import clipped_policy_loss, clipped_value_loss, gae, kl_penalized_rewards, whiten
from rlsparse.train.onpolicy import OnPolicyConfig, OnPolicyTrainer, _positions, token_logprobs


@dataclass
class PPOConfig(OnPolicyConfig):
    """``OnPolicyConfig`` plus PPO's value, GAE and KL options.

    Example:
        >>> PPOConfig(output_dir="out", per_device_train_batch_size=8, num_ppo_epochs=4, kl_coef=0.05)
    """

    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty to the reference."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    value_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the value model (default: learning_rate)."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over each rollout."})


class ValueModel(torch.nn.Module):
    """A copy of the policy's transformer with a zero-initialised linear head: V(state) per token."""

    def __init__(self, policy):
        super().__init__()
        self.backbone = copy.deepcopy(getattr(policy, policy.base_model_prefix))
        self.backbone.requires_grad_(True)
        hidden = policy.config.get_text_config().hidden_size
        weight = next(policy.parameters())
        self.head = torch.nn.Linear(hidden, 1, dtype=weight.dtype, device=weight.device)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int) -> torch.Tensor:
        """Values of the states before each of the last ``completion_length`` tokens (float32)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=_positions(attention_mask), use_cache=False).last_hidden_state
        return self.head(hidden[:, -completion_length - 1:-1]).squeeze(-1).float()


class PPOTrainer(OnPolicyTrainer):
    """PPO with a learned value model; accepts any ``TrainerCallback`` (``MaskCallback`` included).

    Args:
        model: the policy (a causal LM).
        args: a ``PPOConfig``.
        train_dataset: a dataset with a ``prompt`` column (text or chat messages); other columns
            are passed to the reward functions.
        processing_class: the tokenizer.
        reward_funcs: callables in TRL's convention, summed.
        callbacks: more ``TrainerCallback`` objects.
        ref_model: the frozen reference (default: a copy of ``model`` at the start).
        value_model: default ``ValueModel(model)``.

    Example:
        >>> trainer = PPOTrainer(model, PPOConfig(output_dir="out"), ds, tok, reward_funcs=[exact_answer])
        >>> trainer.train()
    """

    algorithm = "ppo"

    def __init__(self, model, args: PPOConfig, train_dataset, processing_class, reward_funcs, callbacks=None,
                 ref_model=None, value_model=None):
        super().__init__(model, args, train_dataset, processing_class, reward_funcs, callbacks, ref_model)
        self.value_model, self.value_optimizer = self._helper(value_model or ValueModel(self.model),
                                                              args.value_learning_rate or args.learning_rate)

    def _needs_reference(self) -> bool:
        return self.args.kl_coef != 0

    def _score_rollout(self, model, batch: dict, rows: list[dict]) -> None:
        args, mask = self.args, batch["mask"]
        n = mask.shape[1]
        scores = self._scores(batch, rows)
        with self._autocast():
            logprobs = token_logprobs(model, batch["input_ids"], batch["attention_mask"], n, args.temperature)
            ref = (token_logprobs(self.ref_model, batch["input_ids"], batch["attention_mask"], n, args.temperature)
                   if args.kl_coef else logprobs)
            values = self.value_model(batch["input_ids"], batch["attention_mask"], n) * mask
        rewards = kl_penalized_rewards(scores, logprobs, ref, mask, args.kl_coef)
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = whiten(advantages, mask)
        batch.update(old_logprobs=logprobs, old_values=values, advantages=advantages, returns=returns)
        self._log("kl", (((logprobs - ref) * mask).sum(dim=1)).mean().item())
        self._log("completion_length", mask.sum(dim=1).mean().item())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n = inputs["mask"].shape[1]
        logprobs = token_logprobs(model, inputs["input_ids"], inputs["attention_mask"], n, self.args.temperature)
        loss, clip_fraction = clipped_policy_loss(logprobs, inputs["old_logprobs"], inputs["advantages"],
                                                  inputs["mask"], self.args.epsilon)
        self._log("policy/clip_fraction", clip_fraction.item())
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._update_value(self._current)
        return loss

    def _update_value(self, batch: dict) -> None:
        args = self.args
        self.value_model.train()
        with self._autocast():
            values = self.value_model(batch["input_ids"], batch["attention_mask"], batch["mask"].shape[1])
            loss = clipped_value_loss(values, batch["old_values"], batch["returns"], batch["mask"],
                                      args.cliprange_value)
        self.value_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), args.max_grad_norm)
        self.value_optimizer.step()
        self._log("value/loss", loss.item())
