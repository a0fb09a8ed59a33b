"""What PPO and PRIME share: a ``transformers.Trainer`` that samples rollouts and takes clipped steps.

One Trainer step is one minibatch update of the policy (so ``max_steps``, gradient clipping,
the learning-rate schedule and every ``TrainerCallback``, ``MaskCallback`` included, work as in
any Trainer). The train sampler hands the same prompt batch to ``num_ppo_epochs *
num_mini_batches`` consecutive steps; the first of them samples the rollout, the rest reuse it.

Layout of one rollout (``per_device_train_batch_size`` prompts x ``num_generations`` samples):
prompts left-padded to a common length, completions right-padded; per-token tensors cover the
completion tokens only and ``mask`` is 1 up to and including each completion's first EOS.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from rlsparse.errors import UsageError


@dataclass
class OnPolicyConfig(TrainingArguments):
    """Rollout and clipped-objective options shared by ``PPOConfig`` and ``PRIMEConfig``.

    ``per_device_train_batch_size`` is the number of prompts per rollout; each Trainer step
    updates the policy on one of ``num_mini_batches`` minibatches of the rollout's
    ``per_device_train_batch_size * num_generations`` samples, ``num_ppo_epochs`` times over.
    """

    num_generations: int = field(default=1, metadata={"help": "Completions sampled per prompt."})
    max_completion_length: int = field(default=64, metadata={"help": "Maximum new tokens per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use it too)."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches per rollout (one Trainer step each)."})
    epsilon: float = field(default=0.2, metadata={"help": "Clip range of the probability ratio."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Keep dataset columns: reward functions receive them (e.g. `answer`)."})

    def __post_init__(self):
        super().__post_init__()
        samples = self.per_device_train_batch_size * self.num_generations
        if self.num_generations < 1 or self.num_ppo_epochs < 1 or self.num_mini_batches < 1:
            raise ValueError("num_generations, num_ppo_epochs and num_mini_batches must be >= 1")
        if samples % self.num_mini_batches:
            raise ValueError(f"per_device_train_batch_size x num_generations = {samples} samples per rollout do not "
                             f"split into num_mini_batches={self.num_mini_batches} equal minibatches")

    @property
    def updates_per_rollout(self) -> int:
        return self.num_ppo_epochs * self.num_mini_batches


def _identity(rows):
    return rows


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int,
                   temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the last ``completion_length`` tokens of ``input_ids`` under ``model``.

    Position ids count real tokens only, as ``generate`` does for left-padded prompts, so the
    forward pass scores exactly what was sampled.
    """
    from trl.trainer.utils import selective_log_softmax

    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                   logits_to_keep=completion_length + 1, use_cache=False).logits
    logits = logits[:, :-1].float() / temperature
    return selective_log_softmax(logits, input_ids[:, -completion_length:])


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def frozen_copy(model):
    """A frozen, eval-mode deep copy (the reference policy)."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


class OnPolicyTrainer(Trainer):
    """Rollouts and minibatch bookkeeping; subclasses fill in ``_score_rollout`` and ``compute_loss``."""

    algorithm = "on-policy"

    def __init__(self, model, args: OnPolicyConfig, train_dataset, processing_class, reward_funcs, callbacks=None,
                 ref_model=None):
        from trl.trainer.utils import disable_dropout_in_model

        funcs = list(reward_funcs or [])
        if not funcs or not all(callable(f) for f in funcs):
            raise UsageError(f"{self.algorithm} needs reward functions (--reward exact_answer or module:function); "
                             "reward models are not supported by this trainer")
        if "prompt" not in train_dataset.column_names:
            raise UsageError(f"{self.algorithm}: the dataset has columns {train_dataset.column_names}, missing "
                             "['prompt']")
        disable_dropout_in_model(model)  # rollout and update then score tokens with the same function
        self.reward_funcs = funcs
        self.ref_model = ref_model
        self._buffer: list[dict] = []
        self._metrics: dict[str, list[float]] = {}
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         data_collator=_identity, callbacks=callbacks)
        # The loss is already a per-token mean; the Trainer must not rescale it by item counts.
        self.model_accepts_loss_kwargs = False
        self._shuffle = torch.Generator().manual_seed(args.seed)
        self._attach_reference(self.model)

    def _needs_reference(self) -> bool:
        return True

    def _autocast(self):
        """The policy's mixed precision for every other forward pass (reference, value model, PRM).

        accelerate runs the policy's own forward under autocast (``--bf16``); the helper models
        must compute the same way, or the KL to an identical reference would not be 0.
        """
        return self.accelerator.autocast()

    def _helper(self, module, lr: float):
        """A trained helper model (PPO's value model, PRIME's PRM) on the policy's device, dropout off,
        with the policy's kind of optimizer (``args.optim``) at ``lr``, without weight decay."""
        from trl.trainer.utils import disable_dropout_in_model

        module = module.to(self.accelerator.device)
        disable_dropout_in_model(module)
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
        return module, cls(module.parameters(), **{**kwargs, "lr": lr})

    def _attach_reference(self, model):
        if self._needs_reference():
            self.ref_model = frozen_copy(model) if self.ref_model is None else self.ref_model
            self.ref_model.to(self.accelerator.device)

    # -- data: the same prompt batch for every update of one rollout --------------------------
    def _get_train_sampler(self, train_dataset=None):
        from trl.trainer.utils import RepeatSampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return RepeatSampler(dataset, mini_repeat_count=1, batch_size=self.args.per_device_train_batch_size,
                             repeat_count=self.args.updates_per_rollout, shuffle=True, seed=self.args.seed)

    def _prepare_inputs(self, rows):
        if not self._buffer:
            rollout = self._rollout(self.model, rows)
            self._buffer = self._minibatches(rollout)
        self._current = self._buffer.pop(0)
        return self._current

    def _minibatches(self, rollout: dict) -> list[dict]:
        n = rollout["input_ids"].shape[0]
        size = n // self.args.num_mini_batches
        batches = []
        for _ in range(self.args.num_ppo_epochs):
            order = torch.randperm(n, generator=self._shuffle)
            for start in range(0, n, size):
                idx = order[start:start + size].to(rollout["input_ids"].device)
                batches.append({k: v[idx] for k, v in rollout.items()})
        return batches

    # -- rollout ------------------------------------------------------------------------------
    def _rollout(self, model, rows: list[dict]) -> dict:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                batch = self._generate(model, rows)
                self._score_rollout(model, batch, rows)
        finally:
            model.train(was_training)
        return batch

    def _generate(self, model, rows: list[dict]) -> dict:
        """Sample ``num_generations`` completions per prompt; returns ids, masks and texts."""
        tok = self.processing_class
        group = self.args.num_generations
        prompts = [_prompt_text(tok, r["prompt"]) for r in rows for _ in range(group)]
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        enc = {k: v.to(self.accelerator.device) for k, v in enc.items()}
        unwrapped = self.accelerator.unwrap_model(model)
        with self._autocast():
            out = unwrapped.generate(**enc, do_sample=True, temperature=self.args.temperature, top_k=0, top_p=1.0,
                                     max_new_tokens=self.args.max_completion_length,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        completion = out[:, enc["input_ids"].shape[1]:]
        mask = _completion_mask(completion, tok.eos_token_id)
        return {"input_ids": out, "attention_mask": torch.cat([enc["attention_mask"], mask], dim=1),
                "mask": mask.to(torch.float32)}

    def _scores(self, batch: dict, rows: list[dict]) -> torch.Tensor:
        """Sum of the reward functions on each completion (TRL's calling convention)."""
        tok = self.processing_class
        group = self.args.num_generations
        n = batch["mask"].shape[1]
        ids = batch["input_ids"][:, -n:]
        texts = tok.batch_decode([seq[m.bool()] for seq, m in zip(ids, batch["mask"])], skip_special_tokens=True)
        repeated = [r for r in rows for _ in range(group)]
        conversational = isinstance(repeated[0]["prompt"], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        columns = {k: [r[k] for r in repeated] for k in repeated[0] if k not in ("prompt", "completion")}
        total = torch.zeros(len(texts), dtype=torch.float32)
        for func in self.reward_funcs:
            values = func(prompts=[r["prompt"] for r in repeated], completions=completions,
                          completion_ids=[seq[m.bool()].tolist() for seq, m in zip(ids, batch["mask"])],
                          trainer_state=self.state, **columns)
            total += torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
        if torch.isnan(total).any():
            raise UsageError(f"{self.algorithm}: a reward function returned None or NaN; every completion needs a "
                             "score")
        self._log("reward", total.mean().item())
        return total.to(self.accelerator.device)

    def _score_rollout(self, model, batch: dict, rows: list[dict]) -> None:
        raise NotImplementedError

    # -- logging ------------------------------------------------------------------------------
    def _log(self, key: str, value: float) -> None:
        self._metrics.setdefault(key, []).append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        metrics = {k: sum(v) / len(v) for k, v in self._metrics.items() if v}
        self._metrics = {}
        super().log({**logs, **metrics}, start_time)


def _prompt_text(tokenizer, prompt) -> str:
    if isinstance(prompt, list):  # conversational: the model's chat template, ready for its reply
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def _completion_mask(completion: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """1 up to and including the first EOS of each row (all of a row without one)."""
    steps = completion.shape[1]
    if eos_token_id is None:
        return torch.ones_like(completion)
    is_eos = completion == eos_token_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], steps,
                                                                                       dtype=torch.long))
    positions = torch.arange(steps, device=completion.device).expand_as(completion)
    return (positions <= first[:, None]).long()
