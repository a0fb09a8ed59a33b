"""What the lab measures, through the same stages every user runs.

Sparsity is ``rlsparse.diff``, the subnetwork is a ``rlsparse.masks.Mask`` file written by
``diff``, update rank is ``rlsparse.analysis.rank`` and subnetwork-only training is
``rlsparse.train.MaskCallback``: the lab reports exactly what the commands would print on the
same checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

TOLERANCES = ("0", "1e-08", "1e-07", "1e-06", "1e-05", "1e-04")
from rlsparse.diff.tolerance import PAPER_TOLERANCE_KEY as PAPER_TOLERANCE  # noqa: E402  (the canonical "1e-05")


def sparsity(base: str | os.PathLike, finetuned: str | os.PathLike, tolerances=TOLERANCES) -> dict:
    """Update sparsity between two checkpoints, in total, per layer, per matrix type and per (layer, type).

    Returns:
        {"numel", "changed": {label: n}, "sparsity": {label: s}, "by_layer", "by_type", "grid"},
        where the groupings map a key ("3", "q", "3|q") to {"numel", "changed": {label: n}}.
    """
    from rlsparse.diff import diff

    r = diff(base, finetuned, tolerances=list(tolerances))
    agg = lambda a: {"numel": a.numel, "changed": {t: int(a.changed[t]) for t in tolerances}}  # noqa: E731
    total = agg(r.total)
    total["sparsity"] = {t: 1 - total["changed"][t] / total["numel"] for t in tolerances}
    return {**total, "by_layer": {str(k): agg(a) for k, a in r.by_layer().items()},
            "by_type": {str(k): agg(a) for k, a in r.by_type().items()},
            "grid": {f"{k[0]}|{k[1]}": agg(a) for k, a in r.grid().items()}}


def update_rank(base: str | os.PathLike, finetuned: str | os.PathLike, max_matrices: int | None = None) -> dict:
    """Mean rank of the 2-D update matrices (embeddings excluded) as a fraction of the maximum (Table 2).

    ``max_matrices`` takes that many matrices evenly spaced over (layer, type) order: on a real
    base the SVDs of all of them cost minutes per checkpoint on CPU.

    Returns:
        {"mean_rank_fraction", "mean_effective_rank_fraction", "per_matrix": {name: fraction}}.
    """
    from rlsparse.analysis.rank import rank

    r = rank(base, finetuned, device="cpu", max_matrices=max_matrices)
    per = {m.name: m.rank_pct / 100 for m in r.matrices}
    eff = [m.effective_rank / m.max_rank for m in r.matrices if m.effective_rank is not None and m.max_rank]
    return {"mean_rank_fraction": sum(per.values()) / len(per) if per else float("nan"),
            "mean_effective_rank_fraction": sum(eff) / len(eff) if eff else float("nan"),
            "per_matrix": per}


def subnetwork_mask(base: str | os.PathLike, finetuned: str | os.PathLike, path: str | os.PathLike,
                    tolerance: str = PAPER_TOLERANCE):
    """The subnetwork of a finetune (changed at ``tolerance``), saved as a mask file at ``path``."""
    from rlsparse.diff import diff
    from rlsparse.masks import Mask

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    diff(base, finetuned, tolerances=[tolerance], mask_path=path, mask_tolerance=tolerance)
    return Mask.load(path)


def changed_outside(base: str | os.PathLike, trained: str | os.PathLike, mask) -> int:
    """Elements that differ from ``base`` (bit for bit) outside ``mask``: 0 when masking held."""
    import tempfile

    from rlsparse.diff import diff
    from rlsparse.masks import Mask

    with tempfile.TemporaryDirectory(prefix="rlsparse-lab-") as tmp:
        moved_path = Path(tmp) / "moved.safetensors"
        diff(base, trained, tolerances=[0.0], mask_path=moved_path, mask_tolerance=0.0)
        moved = Mask.load(moved_path)
        moved.check_compatible(mask, "the trained model and the subnetwork mask")
        return sum(int((moved.get(n) & ~mask.get(n)).sum()) for n in moved.names)



def delta_norm(base: str | os.PathLike, finetuned: str | os.PathLike) -> float:
    """||Δθ||: the L2 norm of finetuned - base over every parameter, widened to fp32 (float64 sum)."""
    from rlsparse.analysis._common import open_checkpoint, pair_tensors
    from rlsparse.io.reader import TensorReader

    import torch

    total = 0.0
    a, b = open_checkpoint(base), open_checkpoint(finetuned)
    with TensorReader() as reader:
        for info_a, info_b in pair_tensors(a, b).values():
            d = reader.read_tensor(info_b).to(torch.float32) - reader.read_tensor(info_a).to(torch.float32)
            total += float(d.double().pow(2).sum())
    return total ** 0.5


def random_rank_control(base: str | os.PathLike, finetuned: str | os.PathLike, seed: int = 0,
                        tolerance: float = 1e-5, max_matrices: int | None = None) -> dict:
    """Table 2's control: the rank of each update matrix with its entries moved to random positions.

    Each 2-D update (embeddings and head excluded, as ``update_rank``) is permuted uniformly at
    random: the same values, the same density, no structure. If that is full rank too, "sparse but
    full rank" says nothing an unstructured sparse update would not.

    Returns:
        {"mean_rank_fraction", "per_matrix": {name: {"control_rank_fraction", "density"}}} (the
        update's own rank is ``update_rank``'s: its SVDs are not repeated here). ``max_matrices``
        keeps that many matrices, evenly spaced (SVDs cost minutes on a real base).
    """
    import torch

    from rlsparse.analysis.rank import matrix_ranks
    from rlsparse.analysis._common import open_checkpoint, pair_tensors
    from rlsparse.io.naming import type_of
    from rlsparse.io.reader import TensorReader

    gen = torch.Generator().manual_seed(seed)
    per = {}
    a, b = open_checkpoint(base), open_checkpoint(finetuned)
    pairs = {n: ab for n, ab in pair_tensors(a, b).items()
             if len(ab[0].shape) == 2 and type_of(n) not in ("embed", "pos_embed", "lm_head")}
    if max_matrices is not None and len(pairs) > max_matrices:
        # Evenly spaced over the checkpoint's order, as update_rank(max_matrices=...) picks them.
        names = list(pairs)
        keep = {names[round(i * (len(names) - 1) / max(1, max_matrices - 1))] for i in range(max_matrices)}
        pairs = {n: ab for n, ab in pairs.items() if n in keep}
    with TensorReader() as reader:
        for name, (info_a, info_b) in pairs.items():
            d = reader.read_tensor(info_b).to(torch.float32) - reader.read_tensor(info_a).to(torch.float32)
            if not bool(d.any()):
                continue
            shuffled = d.flatten()[torch.randperm(d.numel(), generator=gen)].reshape(d.shape)
            full = min(d.shape)
            per[name] = {"control_rank_fraction": matrix_ranks(shuffled)[0] / full,
                         "density": float((d.abs() > tolerance).float().mean())}
    ctrl = [v["control_rank_fraction"] for v in per.values()]
    return {"mean_rank_fraction": sum(ctrl) / len(ctrl) if ctrl else float("nan"), "per_matrix": per}


def spacing_share(base: str | os.PathLike, tolerances=TOLERANCES) -> dict:
    """Table 6's control: the share of base weights whose stored-dtype spacing already exceeds each tolerance.

    Where the spacing exceeds t, any change exceeds t, so sparsity at t can rise above sparsity
    at 0 only through the other weights: ``1 - share`` bounds the rise from number format alone.
    """
    from rlsparse.analysis.precision import precision

    r = precision(base, base, tolerances=[float(t) for t in tolerances])
    total = r.total
    return {label: total.spacing_above[key] / total.numel
            for label, key in zip(tolerances, sorted(total.spacing_above, key=float))}


def completion_token_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 64):
    """Next-token logits at the completion positions of each pair (EOS included), in eval mode.

    Yields, per batch, ``(logits, labels, mask)``: logits ``[batch, k, vocab]`` at the ``k``
    positions where some row of the batch predicts a completion token, the target token ids and a
    bool mask of which of those are completion positions of that row. Shared by ``probe_kl`` and
    ``dataset_nll``.

    Only those positions go through the output head (``logits_to_keep``): on a real base the
    vocabulary is 49k wide and a prompt ~45 tokens, so full logits cost more than the decoder and
    several GB per batch, all of it thrown away by the mask.
    """
    import torch

    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token or ""
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in chunk]
        fulls = [tokenizer(p + c + eos, add_special_tokens=False)["input_ids"] for p, c in chunk]
        width = max(len(f) for f in fulls)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        target = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, (p, f) in enumerate(zip(prompts, fulls)):
            ids[i, :len(f)] = torch.tensor(f)
            att[i, :len(f)] = 1
            target[i, len(p):len(f)] = True  # completion tokens (right padding: positions are plain)
        # position t predicts token t + 1: keep the positions t whose next token is a completion token
        keep = target[:, 1:].any(0).nonzero().flatten()
        # no_grad only around the forward: a grad-mode context held across a yield would leak into the caller
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device),
                           logits_to_keep=keep.to(device)).logits.float()
        yield logits, ids[:, keep + 1].to(device), target[:, keep + 1].to(device)


def probe_kl(base_model, finetuned_model, tokenizer, pairs: list[tuple[str, str]], base_logprobs=None) -> float:
    """Token-level KL(base || finetuned) averaged over the completion tokens of a fixed probe set.

    Both models are in eval mode (no dropout); at every completion position the full next-token
    distributions are compared: sum_v p_base(v) (log p_base(v) - log p_ft(v)).

    ``base_logprobs`` (``probe_logprobs`` of the base on the same pairs) stands in for the base's
    forward: the same tensors, so the same KL bit for bit, without recomputing them for every finetune
    (``base_model`` may then be None).
    """
    import torch

    if base_logprobs is None:
        base_logprobs = probe_logprobs(base_model, tokenizer, pairs)
    total, count = 0.0, 0
    for pb, (lf, _, mask) in zip(base_logprobs, completion_token_logprobs(finetuned_model, tokenizer, pairs)):
        pf = torch.log_softmax(lf[mask], -1)
        kl = (pb.exp() * (pb - pf)).sum(-1)
        total += float(kl.double().sum())
        count += int(mask.sum())
    return total / count if count else float("nan")


def probe_logprobs(model, tokenizer, pairs: list[tuple[str, str]]) -> list:
    """The model's next-token log-probabilities at the probe set's completion positions, one
    ``[tokens, vocab]`` tensor per batch of ``completion_token_logprobs`` (what ``probe_kl`` needs
    from the base)."""
    import torch

    return [torch.log_softmax(logits[mask], -1) for logits, _, mask in completion_token_logprobs(model, tokenizer, pairs)]


def dataset_nll(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Mean per-token negative log-likelihood of the completions under ``model``: how far a dataset
    is from the policy's own distribution (Table 5's "in distribution", measured)."""
    import torch

    total, count = 0.0, 0
    for logits, labels, mask in completion_token_logprobs(model, tokenizer, pairs):
        lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        total -= float(lp[mask].double().sum())
        count += int(mask.sum())
    return total / count if count else float("nan")
