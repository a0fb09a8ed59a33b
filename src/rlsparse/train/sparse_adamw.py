"""AdamW whose state covers only the subnetwork: memory in proportion to the mask's density.

Dense AdamW keeps two moments per element (8 bytes in fp32). ``SparseAdamW`` keeps them for the
masked-in elements only, plus where those elements are, in the fastest form that costs at most
0.3 bytes per element (3.75% of dense state), per tensor:

* flat indices (int32; int64 when a tensor has 2**31 elements or more), 4 bytes per masked-in
  element: up to a density of 7.5%;
* block offsets: the tensor cut in blocks of 256 elements, one byte per masked-in element (its
  offset in its block) and one int32 count per block: up to a density of about 28%;
* a bitmap, 1 bit per element (packed little-endian, bit ``i % 8`` of byte ``i // 8``): above.

Why not int32 indices throughout: they cost half the moments' bytes, 1.5x density of dense AdamW's
state, over the "density + 5%" budget from 10% on. Block offsets keep it at 1.125x density + 0.2%,
the bitmap at density + 1.6%. Indices are decoded once per step per tensor (cheap for block
offsets; a ``nonzero`` over the tensor for the bitmap).

The update is element for element the arithmetic of ``torch.optim.AdamW`` (single-tensor path),
so masked-in elements match dense masked AdamW to within float rounding (bit for bit against
``foreach=False``). Masked-out elements are never read or written: their weights cannot move,
whatever their gradient or the weight decay.
"""

from __future__ import annotations


import torch

from rlsparse.errors import MismatchError, UsageError
from rlsparse.masks import Mask
from rlsparse.train.masking import _check_not_empty, _global_shape, _local, _shard_like, mask_name, match_parameters

_BLOCK = 256  # block offsets fit in one byte
# Bytes per element allowed for positions: 3.75% of dense AdamW's 8, inside the 5% budget.
_OVERHEAD = 0.3
_INT64_FROM = 2**31  # tensors with this many elements or more get int64 flat indices
_POSITION_KEYS = ("positions", "block_counts")
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack_bits(keep: torch.Tensor) -> torch.Tensor:
    flat = keep.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def _unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    return (bits.unsqueeze(1) & _BIT_WEIGHTS.to(bits.device)).ne(0).view(-1)[:numel]


def _positions(keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where the masked-in elements are, in the smallest of three forms (see the module docstring)."""
    flat = keep.reshape(-1)
    numel, count = flat.numel(), int(flat.sum())
    blocks = (numel + _BLOCK - 1) // _BLOCK
    # The fastest form whose bytes stay within the overhead budget; the bitmap always does.
    if count * 4 <= _OVERHEAD * numel:
        form = "indices"
    elif count + blocks * 4 <= _OVERHEAD * numel:
        form = "blocks"
    else:
        form = "bitmap"
    if form == "bitmap":
        return {"positions": _pack_bits(flat)}
    index = flat.nonzero().squeeze(1)
    if form == "indices":
        return {"positions": index.to(torch.int32 if numel < _INT64_FROM else torch.int64)}
    return {"positions": (index % _BLOCK).to(torch.uint8),
            "block_counts": torch.bincount(index // _BLOCK, minlength=blocks).to(torch.int32)}


def _indices(state: dict, numel: int) -> torch.Tensor:
    """Flat indices of the masked-in elements, decoded for one step."""
    positions = state["positions"]
    counts = state.get("block_counts")
    if counts is not None:
        starts = torch.arange(counts.numel(), dtype=torch.int64, device=positions.device) * _BLOCK
        return torch.repeat_interleave(starts, counts, output_size=positions.numel()).add_(positions)
    if positions.dtype == torch.uint8:
        return _unpack_bits(positions, numel).nonzero().squeeze(1)
    return positions


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over the masked-in elements only; masked-out elements never move.

    Usable as the optimizer of any transformers/TRL trainer. Parameters are named through
    ``module`` (or by passing ``model.named_parameters()``), so the mask's tensors can be found.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or param-group dicts of either.
        mask: the subnetwork (True = trainable).
        module: the model the parameters belong to; needed when ``params`` carry no names.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``; decay reaches masked-in elements only.
        fused: run torch's fused AdamW kernel on the gathered masked-in elements (bit-identical to
            ``torch.optim.AdamW(fused=True)`` there); False: the single-tensor arithmetic
            (bit-identical to ``foreach=False``). Default: fused where torch has the kernel.

    Example:
        >>> opt = SparseAdamW(model.named_parameters(), mask, lr=1e-5)
        >>> trainer = SFTTrainer(model=model, ..., optimizers=(opt, None))
        >>> # or: SFTTrainer(..., optimizer_cls_and_kwargs=(SparseAdamW, {"mask": mask, "module": model}))
    """

    handles_mask = True  # attach_mask leaves gradients and decay to us

    def __init__(self, params, mask: Mask, *, module: torch.nn.Module | None = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 fused: bool | None = None):
        if not 0.0 <= lr or not 0.0 <= eps or not all(0.0 <= b < 1.0 for b in betas):
            raise UsageError(f"SparseAdamW: lr={lr}, eps={eps}, betas={betas}; expected lr, eps >= 0 and 0 <= beta < 1")
        _check_not_empty(mask)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.mask = mask
        self.fused = hasattr(torch, "_fused_adamw_") if fused is None else bool(fused)
        if self.fused and not hasattr(torch, "_fused_adamw_"):
            raise UsageError("SparseAdamW(fused=True): this torch has no fused AdamW kernel; pass fused=False")
        self._name_groups(module)

    def _name_groups(self, module) -> None:
        known = {id(m.param): m.name for m in match_parameters(module, self.mask)} if module is not None else {}
        problems = []
        for group in self.param_groups:
            if module is None and "param_names" not in group:
                raise UsageError(
                    "SparseAdamW cannot tell which mask tensor belongs to which parameter; pass "
                    "model.named_parameters() as params, or module=model"
                )
            names = [known.get(id(p)) for p in group["params"]] if module is not None else [
                mask_name(n) for n in group["param_names"]]
            for p, name in zip(group["params"], names):
                if name is None or name not in self.mask:
                    problems.append(f"a parameter of shape {list(_global_shape(p))} has no mask tensor ({name})")
                elif tuple(self.mask.shape(name)) != _global_shape(p):
                    problems.append(f"{name}: mask {list(self.mask.shape(name))} vs parameter {list(_global_shape(p))}")
            group["mask_names"] = names
        if problems:
            raise MismatchError(f"SparseAdamW: the mask does not fit the parameters: {len(problems)} problems "
                                f"(e.g. {problems[:3]}); use a mask computed against this model")

    def _init_state(self, p: torch.Tensor, name: str, state: dict) -> None:
        # Built at the first step, not in __init__: FSDP2 swaps parameters for DTensor shards in
        # between, and each rank keeps state for its own shard only.
        keep = _shard_like(self.mask.get(name), p).reshape(-1)
        count = int(keep.sum())
        state["step"] = torch.tensor(0.0)
        state.update(_positions(keep))
        local = _local(p)
        state["exp_avg"] = torch.zeros(count, dtype=local.dtype, device=local.device)
        state["exp_avg_sq"] = torch.zeros(count, dtype=local.dtype, device=local.device)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``SparseAdamW`` (positions keep their integer dtype) or by dense
        ``torch.optim.AdamW`` (its moments are gathered at the mask's elements).

        torch's ``Optimizer.load_state_dict`` casts every state tensor of a floating-point
        parameter to the parameter's dtype, positions included (and bf16 cannot even hold index
        257 exactly), so positions are taken back from ``state_dict`` untouched.
        """
        names = [g["mask_names"] for g in self.param_groups]
        saved = state_dict.get("state", {})
        saved_ids = [i for g in state_dict.get("param_groups", []) for i in g["params"]]
        super().load_state_dict(state_dict)
        for group, group_names in zip(self.param_groups, names):
            group["mask_names"] = group_names  # a dense AdamW state has none; ours are the same
        params = [(p, n) for g in self.param_groups for p, n in zip(g["params"], g["mask_names"])]
        problems = []
        for i, (p, name) in zip(saved_ids, params):
            old = saved.get(i)
            if not old:
                continue
            state = self.state[p]
            if "positions" in old:
                for key in _POSITION_KEYS:
                    if key in old:
                        state[key] = old[key].to(device=_local(p).device)
                expected = int(_shard_like(self.mask.get(name), p).sum())
                if state["exp_avg"].numel() != expected:
                    problems.append(f"{name}: state for {state['exp_avg'].numel()} elements, mask has {expected}")
            elif "exp_avg" in old and tuple(old["exp_avg"].shape) == tuple(_local(p).shape):
                self._from_dense(p, name, state)
            else:
                raise UsageError(f"SparseAdamW: the optimizer state of {name} holds {sorted(old)}; expected "
                                 "SparseAdamW's or AdamW's; resume with the optimizer that wrote it")
        if problems:
            raise MismatchError(f"SparseAdamW: the optimizer state was saved for a different mask ({len(problems)} "
                                f"tensors differ, e.g. {problems[:2]}); resume with the mask of the saved run")

    def _from_dense(self, p: torch.Tensor, name: str, state: dict) -> None:
        keep = _shard_like(self.mask.get(name), p).reshape(-1)
        positions = _positions(keep)
        index = _indices(positions, keep.numel())
        local = _local(p)
        dense = {k: state[k] for k in ("exp_avg", "exp_avg_sq")}
        step = state["step"]
        state.clear()
        state["step"] = torch.tensor(float(step))
        state.update(positions)
        for k, v in dense.items():
            state[k] = _local(v).reshape(-1).index_select(0, index).to(dtype=local.dtype, device=local.device)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update of the masked-in elements of every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
            for p, name in zip(group["params"], group["mask_names"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, name, state)
                if state["exp_avg"].numel() == 0:
                    continue
                state["step"] += 1
                step = float(state["step"])
                flat = _local(p).view(-1)
                numel = flat.numel()
                index = _indices(state, numel)
                grad = _local(p.grad).reshape(-1).index_select(0, index)
                weight = flat.index_select(0, index)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if self.fused:
                    # the kernel of torch.optim.AdamW(fused=True), on the gathered elements only
                    torch._fused_adamw_([weight], [grad], [exp_avg], [exp_avg_sq], [], [state["step"]],
                                        amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=decay,
                                        eps=eps, maximize=False, grad_scale=None, found_inf=None)
                    flat.index_put_((index,), weight)
                    continue
                # torch.optim.AdamW's single-tensor arithmetic, in the same order
                weight.mul_(1 - lr * decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
                weight.addcdiv_(exp_avg, denom, value=-step_size)
                flat.index_put_((index,), weight)
        return loss

    def state_bytes(self) -> int:
        """Bytes held in optimizer state on this rank (moments, positions, step counters)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values() if torch.is_tensor(v))


def planned_state_bytes(mask: Mask) -> int:
    """Bytes of fp32 state SparseAdamW will hold for ``mask`` (one rank, no sharding): two moments
    per masked-in element, the positions in the form ``_positions`` picks, one step counter per tensor.

    Dense ``torch.optim.AdamW`` holds ``8 * numel + 4`` bytes per tensor for comparison.

    Example:
        >>> planned_state_bytes(mask) / (8 * mask.numel)
    """
    total = 0
    for name in mask.names:
        keep = mask.get(name).reshape(-1)
        positions = sum(v.numel() * v.element_size() for v in _positions(keep).values())
        total += 8 * int(keep.sum()) + 4 + positions
    return total
