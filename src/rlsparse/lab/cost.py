"""Where a training step's time goes: generation, policy forward/backward, reference forward, optimizer.

On the real base an on-policy step costs tens of seconds on CPU, so the lab records, per run, the
wall time of each phase. ``StepCost`` wraps a few methods of one trainer *instance* (no class or
library code is changed) and is a ``TrainerCallback`` for the step boundaries.

Phases:
    generation: sampling completions (``_generate`` of the on-policy trainers).
    scoring_forward: forward passes without gradients (old-policy and reference log-probabilities;
        for PPO and PRIME the whole rollout scoring: rewards, values, reference and PRM passes).
    train_forward_backward: ``training_step`` minus the two above (the loss, its backward).
    optimizer_and_rest: the rest of the step (optimizer, scheduler, callbacks, logging).
"""

from __future__ import annotations

import functools
import time

# Methods whose time is not the policy's own forward/backward.
_GENERATION = ("_generate",)
_SCORING = ("_get_per_token_logps_and_entropies", "compute_ref_log_probs", "_compute_ref_log_probs",
            "_score_rollout")


class StepCost:
    """Per-phase wall time of every optimizer step of one trainer (a duck-typed ``TrainerCallback``, so
    importing this module does not import transformers).

    Example:
        >>> cost = StepCost(); cost.attach(trainer); trainer.add_callback(cost); trainer.train()
        >>> cost.summary()["per_step_seconds"]
    """

    def __init__(self):
        self.steps: list[dict] = []
        self._phase = {"generation": 0.0, "scoring_forward": 0.0, "training_step": 0.0}
        self._step_start = None
        self._depth = 0

    def attach(self, trainer) -> "StepCost":
        """Wrap the trainer instance's generation, scoring and training_step methods with timers."""
        for name in _GENERATION:
            self._wrap(trainer, name, "generation")
        for name in _SCORING:
            self._wrap(trainer, name, "scoring_forward", only_without_grad=True)
        self._wrap(trainer, "training_step", "training_step")
        ref = getattr(trainer, "ref_model", None)
        if ref is not None and not hasattr(trainer, "_get_per_token_logps_and_entropies"):
            # Off-policy trainers (DPO) call their reference model inline in the loss.
            ref.register_forward_pre_hook(lambda module, args: self._ref_start())
            ref.register_forward_hook(lambda module, args, out: self._ref_end())
        return self

    def _ref_start(self) -> None:
        self._ref_t = time.perf_counter()

    def _ref_end(self) -> None:
        self._phase["scoring_forward"] += time.perf_counter() - self._ref_t

    def _wrap(self, trainer, name: str, phase: str, only_without_grad: bool = False) -> None:
        import torch

        method = getattr(trainer, name, None)
        if method is None:
            return

        @functools.wraps(method)
        def timed(*args, **kwargs):
            # Nested timed calls (generation inside training_step) are counted once, in the inner phase.
            if only_without_grad and torch.is_grad_enabled():
                return method(*args, **kwargs)
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._phase[phase] += time.perf_counter() - start

        setattr(trainer, name, timed)

    def __getattr__(self, name: str):
        # Every other TrainerCallback event is a no-op; transformers looks each one up by name.
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()
        self._phase = dict.fromkeys(self._phase, 0.0)

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is None:
            return
        total = time.perf_counter() - self._step_start
        gen, score, step = self._phase["generation"], self._phase["scoring_forward"], self._phase["training_step"]
        # Generation and scoring run inside training_step (TRL's on-policy trainers, DPO's reference).
        inside = gen + score if step >= gen + score else 0.0
        self.steps.append({"total": total, "generation": gen, "scoring_forward": score,
                           "train_forward_backward": max(0.0, step - inside),
                           "optimizer_and_rest": max(0.0, total - max(step, gen + score))})

    def summary(self, upto: int | None = None) -> dict:
        """Mean seconds per step for each phase, and the number of steps measured (the first ``upto`` only)."""
        steps = self.steps[:upto] if upto is not None else self.steps
        if not steps:
            return {"steps": 0}
        n = len(steps)
        mean = {k: round(sum(s[k] for s in steps) / n, 3) for k in steps[0]}
        return {"steps": n, "per_step_seconds": mean}


def signal_steps(log_history: list[dict]) -> dict | None:
    """How many on-policy steps carried a learning signal (some group's rewards were not all equal).

    TRL logs ``frac_reward_zero_std`` per step: the share of groups whose rewards were identical,
    which give zero advantage. A step with a share below 1 had at least one mixed group.
    """
    shares = [e["frac_reward_zero_std"] for e in log_history if "frac_reward_zero_std" in e]
    if not shares:
        return None
    return {"steps": len(shares), "with_signal": sum(s < 1 for s in shares),
            "mean_mixed_group_share": round(1 - sum(shares) / len(shares), 4)}
