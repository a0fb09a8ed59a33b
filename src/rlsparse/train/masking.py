"""Attach a subnetwork mask to a model and its optimizer, so only masked-in elements train.

Conjecture 1 of the paper: finetune from the same start with the same data and hyperparameters,
but multiply the gradient by the mask "right before the parameter update". This module does that
for any model and any torch optimizer, in a plain loop or under a transformers ``Trainer``.

Where the mask is applied (``order``):

* ``"after_clip"`` (default, the paper's setting): an optimizer step pre-hook fills masked-out
  gradients with zero after gradient clipping, right before ``optimizer.step()``. The clip norm is
  computed over the full gradient, as in the full-finetuning run being reproduced.
* ``"before_clip"``: a hook on each parameter's gradient fills masked-out entries with zero before
  accumulation and before any DDP / DeepSpeed reduction (a post-accumulate-grad hook on FSDP2's
  DTensor parameters, whose tensor hooks never fire). The clip norm then sees only the subnetwork.
  This is the only order DeepSpeed allows: it steps inside ``backward``.

Why not ``on_pre_optimizer_step`` alone: under DeepSpeed it fires after the step has happened.
Why ``masked_fill`` and not a multiplication: ``inf * 0`` is NaN and would poison the weights.
Why weight decay needs care: decoupled decay (AdamW) moves every weight, even with a zero
gradient. With ``weight_decay="mask"`` the optimizer's own decay is switched off for the step and
applied here to masked-in elements only; ``"refuse"`` raises instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from rlsparse.errors import MaskError, MismatchError, UsageError
from rlsparse.io.naming import strip_prefixes
from rlsparse.masks import Mask

ORDERS = ("after_clip", "before_clip")
WEIGHT_DECAY_MODES = ("mask", "refuse")

# Optimizers whose weight-decay rule we know, so we can confine it to the mask.
_DECOUPLED_BY_DEFAULT = (torch.optim.AdamW,)
_COUPLED_OR_FLAGGED = (torch.optim.Adam, torch.optim.SGD, torch.optim.NAdam, torch.optim.RAdam,
                       torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adamax)


def mask_name(param_name: str) -> str:
    """The checkpoint tensor name for a ``model.named_parameters()`` name.

    Example:
        >>> mask_name("module._orig_mod.model.layers.0.mlp.up_proj.weight")
        'model.layers.0.mlp.up_proj.weight'
    """
    return strip_prefixes(param_name)[0]


@dataclass
class MaskedParam:
    """One model parameter and its mask: ``frozen`` is True where the element must not move."""

    name: str
    param: torch.nn.Parameter
    frozen: torch.Tensor | None = None  # local to this rank (a shard under FSDP2); None = all in mask
    count: int = 0
    aliases: list[str] = field(default_factory=list)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank owns: a DTensor's local shard, anything else as is."""
    return t._local_tensor if _is_dtensor(t) else t


def _global_shape(p: torch.Tensor) -> tuple[int, ...]:
    if hasattr(p, "ds_shape"):  # DeepSpeed ZeRO-3 leaves a 0-element placeholder in the module
        return tuple(p.ds_shape)
    return tuple(p.shape)


def _shard_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``full`` cut the way ``p`` is cut on this rank (whole tensor unless ``p`` is a DTensor)."""
    if _is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds the whole mask, so each slices its own shard
        # without a collective (and without every rank having to reach this line together).
        return distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
    return full.to(_local(p).device)


def match_parameters(model: torch.nn.Module, mask: Mask) -> list[MaskedParam]:
    """Pair every parameter of ``model`` with its mask tensor, or raise listing every mismatch.

    Tied parameters (one Parameter under two names, e.g. ``lm_head.weight`` and
    ``model.embed_tokens.weight``) match whichever name the mask has. Trainable parameters the mask
    does not cover, mask tensors with no parameter, and shape differences are all reported at once.
    The returned entries have no ``frozen`` tensor yet (see ``attach_mask``).

    Example:
        >>> [m.name for m in match_parameters(model, mask)][:1]
        ['model.embed_tokens.weight']
    """
    by_id: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    for raw, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), (p, []))[1].append(mask_name(raw))

    matched, uncovered, shapes, disagree, used = [], [], [], [], set()
    for p, names in by_id.values():
        names = list(dict.fromkeys(names))
        in_mask = [n for n in names if n in mask]
        if not in_mask:
            if p.requires_grad:
                uncovered.append(names[0])
            continue
        used.update(in_mask)
        name = in_mask[0]
        if tuple(mask.shape(name)) != _global_shape(p):
            shapes.append(f"{name}: mask {list(mask.shape(name))} vs model {list(_global_shape(p))}")
            continue
        for other in in_mask[1:]:
            if tuple(mask.shape(other)) != tuple(mask.shape(name)) or not torch.equal(mask.get(other), mask.get(name)):
                disagree.append(f"{name} / {other}")
        matched.append(MaskedParam(name=name, param=p, count=mask.count(name), aliases=in_mask))

    orphans = sorted(set(mask.names) - used)
    problems = []
    if orphans:
        problems.append(f"{len(orphans)} mask tensors match no parameter (e.g. {orphans[:3]})")
    if uncovered:
        problems.append(f"{len(uncovered)} trainable parameters are not in the mask (e.g. {uncovered[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} shapes differ (e.g. {shapes[0]})")
    if disagree:
        problems.append(f"tied parameters have different masks ({disagree[:3]})")
    if problems:
        raise MismatchError(
            "the mask does not describe this model: " + "; ".join(problems)
            + "; use a mask computed against this model's base checkpoint"
        )
    return matched


def _check_not_empty(mask: Mask) -> None:
    if mask.ones == 0:
        raise MaskError(
            f"the mask selects no elements (0 of {mask.numel:,}); nothing would train; "
            "check the tolerance used to build it, or omit --mask for full finetuning"
        )


def _unwrap_optimizer(optimizer):
    """The torch optimizer that really steps (accelerate wraps it in AcceleratedOptimizer)."""
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer):
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return optimizer


def _decouples_weight_decay(optimizer, group) -> bool | None:
    """True for AdamW-style decay, False for L2 added to the gradient, None if unknown."""
    if isinstance(optimizer, _DECOUPLED_BY_DEFAULT):
        return True
    if isinstance(optimizer, _COUPLED_OR_FLAGGED):
        return bool(group.get("decoupled_weight_decay", False))
    return None


def _uses_deepspeed(model: torch.nn.Module) -> bool:
    if type(model).__name__ == "DeepSpeedEngine" or any(hasattr(p, "ds_id") for p in model.parameters()):
        return True
    try:
        from accelerate.state import AcceleratorState, DistributedType

        return bool(AcceleratorState._shared_state) and AcceleratorState().distributed_type == DistributedType.DEEPSPEED
    except Exception:  # accelerate absent or its state half-initialised: not DeepSpeed
        return False


class MaskHandle:
    """What ``attach_mask`` returns: hooks to remove, and checks on the result.

    Example:
        >>> handle = attach_mask(model, mask, optimizer)
        >>> start = handle.snapshot()
        >>> ...  # train
        >>> handle.verify(start)
        >>> handle.detach()
    """

    def __init__(self, model, mask: Mask, params: list[MaskedParam], optimizer, order: str,
                 weight_decay: str, deepspeed: bool):
        self.model = model
        self.mask = mask
        self.params = params
        self.optimizer = optimizer
        self.order = order
        self.weight_decay = weight_decay
        self.deepspeed = deepspeed
        self._hooks: list = []
        self._state_clean = False
        self._saved_decay: list[tuple[dict, float]] = []
        self._by_param = {id(m.param): m for m in params}
        self._frozen_nans: list | None = None

    # hooks ------------------------------------------------------------------------------------
    def _install(self) -> None:
        if self.order == "before_clip":
            for m in self.params:
                if m.frozen is None or not m.param.requires_grad:
                    continue
                if _is_dtensor(m.param):
                    # FSDP2: autograd sees the unsharded parameter, so tensor hooks on the sharded
                    # DTensor never fire; FSDP2 calls post-accumulate hooks after reduce-scatter.
                    self._hooks.append(m.param.register_post_accumulate_grad_hook(self._fill_grad_hook(m)))
                else:
                    frozen = m.frozen
                    self._hooks.append(m.param.register_hook(lambda g, frozen=frozen: g.masked_fill(frozen, 0)))
        if self.optimizer is not None:
            inner = _unwrap_optimizer(self.optimizer)
            self._hooks.append(inner.register_step_pre_hook(self._before_step))
            self._hooks.append(inner.register_step_post_hook(self._after_step))
            if hasattr(inner, "register_load_state_dict_post_hook"):
                self._hooks.append(inner.register_load_state_dict_post_hook(lambda opt: self._mark_state_dirty()))

    @staticmethod
    def _fill_grad_hook(m: MaskedParam):
        def hook(param):
            if param.grad is not None:
                _local(param.grad).masked_fill_(m.frozen, 0)
        return hook

    def _mark_state_dirty(self) -> None:
        self._state_clean = False

    def mask_grads(self) -> None:
        """Fill masked-out gradients with zero now (for loops that step without our optimizer hook)."""
        for m in self.params:
            if m.frozen is not None and m.param.grad is not None:
                _local(m.param.grad).masked_fill_(m.frozen, 0)

    def zero_masked_state(self) -> None:
        """Zero the optimizer state (Adam moments, momentum) of masked-out elements.

        Needed when the optimizer state was loaded from a dense run: a nonzero moment would keep
        moving a masked-out weight even with a zero gradient.
        """
        inner = _unwrap_optimizer(self.optimizer)
        if getattr(inner, "handles_mask", False):
            return
        for m in self.params:
            if m.frozen is None:
                continue
            for value in inner.state.get(m.param, {}).values():
                if torch.is_tensor(value) and value.shape == m.param.shape:
                    _local(value).masked_fill_(m.frozen, 0)
        self._state_clean = True

    def _before_step(self, optimizer, args, kwargs) -> None:
        if getattr(optimizer, "handles_mask", False):
            return  # SparseAdamW steps only masked-in elements and decays only them
        # before_clip masked the gradients already, but clipping after a NaN/inf loss multiplies
        # every gradient by a NaN coefficient, zeros included: fill them again after clipping.
        self.mask_grads()
        if self._frozen_nans is None:
            self._frozen_nans = self._find_frozen_nans()
        if not self._state_clean:
            self.zero_masked_state()
        self._confine_weight_decay(optimizer)

    def _confine_weight_decay(self, optimizer) -> None:
        for group in optimizer.param_groups:
            decay = group.get("weight_decay", 0.0)
            members = [self._by_param.get(id(p)) for p in group["params"]]
            if not decay or not any(m is not None and m.frozen is not None for m in members):
                continue
            if self.weight_decay == "refuse":
                raise UsageError(_refuse_message(decay))
            decoupled = _decouples_weight_decay(optimizer, group)
            if decoupled is None:
                raise UsageError(
                    f"weight_decay={decay} with {type(optimizer).__name__}: rlsparse cannot confine its decay "
                    "to the mask; set weight_decay=0, or use torch AdamW/Adam/SGD or rlsparse SparseAdamW"
                )
            lr = group["lr"]
            with torch.no_grad():
                for p, m in zip(group["params"], members):
                    if decoupled:
                        # the same arithmetic as torch AdamW's ``param.mul_(1 - lr * wd)``, in the mask only
                        kept = _local(p).mul(1 - lr * decay)
                        _local(p).copy_(kept if m is None or m.frozen is None else torch.where(m.frozen, _local(p), kept))
                    elif p.grad is not None:
                        l2 = _local(p).mul(decay)
                        if m is not None and m.frozen is not None:
                            l2.masked_fill_(m.frozen, 0)
                        _local(p.grad).add_(l2)
            self._saved_decay.append((group, decay))
            group["weight_decay"] = 0.0

    def _find_frozen_nans(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # Arithmetic on a NaN may change its payload (NaN + 0 can come out as another NaN), so a
        # frozen NaN is put back bit for bit after each step. Frozen elements never change, so
        # where they are NaN is found once.
        found = []
        for m in self.params:
            if m.frozen is None or not _local(m.param).is_floating_point():
                continue
            local = _local(m.param).detach()
            where = (local.isnan() & m.frozen).reshape(-1).nonzero().squeeze(1)
            if where.numel():
                found.append((local, where, _int_view(local).reshape(-1).index_select(0, where)))
        return found

    def _after_step(self, optimizer, args, kwargs) -> None:
        for local, where, bits in self._frozen_nans or ():
            with torch.no_grad():
                _int_view(local).view(-1).index_copy_(0, where, bits)
        for group, decay in self._saved_decay:
            group["weight_decay"] = decay
        self._saved_decay.clear()

    # results ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, torch.Tensor]:
        """A CPU copy of every masked parameter as this rank holds it, for ``verify``."""
        return {m.name: _local(m.param).detach().to("cpu", copy=True) for m in self.params if m.frozen is not None}

    def verify(self, initial_state: Mapping[str, torch.Tensor]) -> None:
        """Raise MaskError unless every masked-out element is bit-identical to ``initial_state``."""
        _verify(self.params, initial_state)

    def detach(self) -> None:
        """Remove every hook; the model and optimizer behave as if never masked."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._after_step(None, (), {})


def _refuse_message(decay: float) -> str:
    return (
        f"weight_decay={decay} would move masked-out weights (decoupled decay shrinks every weight, "
        "even with a zero gradient); set weight_decay=0, or use weight_decay='mask' to decay the subnetwork only"
    )


def attach_mask(
    model: torch.nn.Module,
    mask: Mask,
    optimizer: torch.optim.Optimizer | None = None,
    order: str = "after_clip",
    weight_decay: str = "mask",
    deepspeed: bool | None = None,
) -> MaskHandle:
    """Make only the mask's elements trainable, by masking gradients right before each update.

    Call it after ``accelerator.prepare`` (FSDP2 replaces parameters with DTensors there).
    The mask is checked against the model first: names, shapes, and at least one element.

    Args:
        model: the model being trained (wrapped or not).
        mask: the subnetwork; True = trainable.
        optimizer: the optimizer that steps ``model``. Required for ``order="after_clip"``; with
            it, weight decay is confined to the mask and dense optimizer state is zeroed outside it.
        order: ``"after_clip"`` (the paper's: clip the full gradient, then mask) or
            ``"before_clip"`` (mask each gradient as it is produced; clipping sees the subnetwork only).
        weight_decay: ``"mask"`` decays masked-in elements only; ``"refuse"`` raises UsageError on
            any weight decay that would reach a masked-out element.
        deepspeed: whether DeepSpeed steps the model; None detects it.

    Returns:
        A ``MaskHandle`` with ``detach()``, ``snapshot()``, ``verify(initial_state)``.

    Example:
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        >>> handle = attach_mask(model, Mask.load("sub.mask.safetensors"), opt)
        >>> loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    """
    if order not in ORDERS:
        raise UsageError(f"order={order!r}; expected one of {ORDERS}")
    if weight_decay not in WEIGHT_DECAY_MODES:
        raise UsageError(f"weight_decay={weight_decay!r}; expected one of {WEIGHT_DECAY_MODES}")
    _check_not_empty(mask)
    params = match_parameters(model, mask)
    deepspeed = _uses_deepspeed(model) if deepspeed is None else deepspeed
    if deepspeed:
        _check_deepspeed(order, optimizer)
        optimizer = None  # DeepSpeed steps flat fp32 partitions; hooks on its optimizer see no names
    elif order == "after_clip" and optimizer is None:
        raise UsageError(
            "order='after_clip' masks inside optimizer.step(), but no optimizer was given; "
            "pass optimizer=..., or order='before_clip'"
        )
    _set_frozen(params, mask)
    handle = MaskHandle(model, mask, params, optimizer, order, weight_decay, deepspeed)
    if optimizer is not None and weight_decay == "refuse":
        handle._confine_weight_decay(_unwrap_optimizer(optimizer))  # raises now, not at step 1
    handle._install()
    return handle


def _check_deepspeed(order: str, optimizer) -> None:
    if order != "before_clip":
        raise UsageError(
            "under DeepSpeed the optimizer steps inside backward, so gradients cannot be masked after "
            "clipping; pass order='before_clip' (mask_order='before_clip' on the command line)"
        )
    opt = _unwrap_optimizer(optimizer) if optimizer is not None else None
    for group in getattr(opt, "param_groups", []):
        if group.get("weight_decay", 0.0):
            raise UsageError(
                f"weight_decay={group['weight_decay']} under DeepSpeed: its optimizer decays every "
                "element of the fp32 master weights, masked-out ones included; set weight_decay=0"
            )


def _int_view(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


def _verify(params: Iterable[MaskedParam], initial_state: Mapping[str, torch.Tensor]) -> None:
    initial = {mask_name(k): v for k, v in initial_state.items()}
    moved, missing = [], []
    total = 0
    for m in params:
        if m.frozen is None:
            continue
        before = initial.get(m.name)
        if before is None:
            missing.append(m.name)
            continue
        now = _local(m.param).detach().cpu()
        before = before.detach()
        if tuple(before.shape) != tuple(now.shape):
            before = _shard_like(before, m.param).cpu()  # a full tensor given for a sharded parameter
        frozen = m.frozen.cpu()
        changed = int((_int_view(now)[frozen] != _int_view(before.to(now.dtype))[frozen]).sum())
        if changed:
            moved.append(f"{m.name} ({changed:,})")
            total += changed
    if missing:
        raise MaskError(f"verify: the initial state lacks {len(missing)} masked tensors (e.g. {missing[:3]}); "
                        "pass the snapshot taken before training")
    if moved:
        raise MaskError(
            f"verify failed: {total:,} masked-out elements changed in {len(moved)} tensors (e.g. {moved[:3]}); "
            "expected none; something outside rlsparse updated them (optimizer state, weight decay, a second optimizer)"
        )


def verify_unchanged(model: torch.nn.Module, mask: Mask, initial_state: Mapping[str, torch.Tensor]) -> None:
    """Raise MaskError unless every masked-out element of ``model`` is bit-identical to the start.

    Compares integer views, so -0.0 vs 0.0 or a changed NaN payload counts as a change.

    Example:
        >>> start = {n: p.detach().clone() for n, p in model.named_parameters()}
        >>> ...  # masked training
        >>> verify_unchanged(model, mask, start)
    """
    params = match_parameters(model, mask)
    _set_frozen(params, mask)
    _verify(params, initial_state)


def _set_frozen(params: list[MaskedParam], mask: Mask) -> None:
    # From the bits, never from the metadata's counts: a file whose counts lie must not decide
    # what trains (Mask checks its counts against its bits when they are read).
    for m in params:
        m.frozen = _shard_like(~mask.get(m.name), m.param)
        if not bool(m.frozen.any()):
            m.frozen = None  # this rank's shard is all trainable
