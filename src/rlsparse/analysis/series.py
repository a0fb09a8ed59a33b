"""Sparsity along a training run (the paper's Figures 2, 5, 6, 7 and Appendix D).

With base θ_init and checkpoints θ_1..θ_n (in training order), at a tolerance t:
- ``sparsity_k = sparsity(θ_init, θ_k)``: the share of elements equal to the base at step k.
- ``consecutive_k = sparsity(θ_{k-1}, θ_k)`` for k = 2..n: what one interval leaves untouched.
- ``outside_final_k``: the share of all elements changed at step k but unchanged in θ_n
  (Figure 6: updated weights that lie outside the final subnetwork).
- The three-way split of every element (Figure 2): *never updated* (equal to the base at every
  checkpoint), *cancelled* (changed at some checkpoint but equal to the base at θ_n), and the
  *final subnetwork* (changed at θ_n). The three fractions sum to 1.

Runs as one kernel (``SeriesKernel``) on the stream engine: every checkpoint is read once, in
step, chunk by chunk; memory is bounded by the buffer pool whatever n.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rlsparse._version import __version__
from rlsparse.analysis._common import (PAPER_TOLERANCE, SCHEMA_VERSION, check_tolerance, layer_key, open_checkpoint,
                                       popcount, sorted_layers, sorted_types, stream_items, stream_runner)
from rlsparse.diff.kernel import changed_packed
from rlsparse.errors import CheckpointError, UsageError
from rlsparse.io.naming import type_of

_STEP = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class SeriesResult:
    """Counts along a run. Lists are per checkpoint, in the order given.

    Example:
        >>> r = series("sft", find_checkpoints("runs/prime"))
        >>> r.sparsity, r.never_updated, r.cancelled, r.final_subnetwork
    """

    base: str
    checkpoints: list[str]
    steps: list[int | None]
    tolerance: float
    numel: int
    changed: list[int]  # vs the base, per checkpoint
    consecutive_changed: list[int]  # between checkpoint k-1 and k, for k = 2..n
    outside_final: list[int]  # changed at k, unchanged at the final checkpoint
    never: int
    cancelled_count: int
    notes: list[str] = field(default_factory=list)
    tensor_counts: dict[str, np.ndarray] = field(default_factory=dict)  # per tensor: SeriesKernel's vector
    tensor_numel: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    elapsed_s: float = 0.0

    @property
    def sparsity(self) -> list[float]:
        return [1 - c / self.numel for c in self.changed]

    @property
    def consecutive_sparsity(self) -> list[float]:
        return [1 - c / self.numel for c in self.consecutive_changed]

    @property
    def outside_final_fraction(self) -> list[float]:
        """Figure 6: per checkpoint, changed-at-k-but-not-in-the-final elements / all elements."""
        return [c / self.numel for c in self.outside_final]

    @property
    def never_updated(self) -> float:
        return self.never / self.numel

    @property
    def cancelled(self) -> float:
        return self.cancelled_count / self.numel

    @property
    def final_subnetwork(self) -> float:
        return self.changed[-1] / self.numel

    @property
    def ever_updated_outside_final(self) -> float | None:
        """Of the elements ever updated, the share outside the final subnetwork (paper: ~8.5%)."""
        ever = self.numel - self.never
        return self.cancelled_count / ever if ever else None

    def _summary(self, names: list[str]) -> dict:
        n = len(self.checkpoints)
        numel = sum(self.tensor_numel[k] for k in names)
        c = _split(sum(self.tensor_counts[k] for k in names), n)
        frac = (lambda x: x / numel if numel else None)  # noqa: E731
        return {"numel": numel, "changed": c["changed"], "sparsity": [1 - frac(x) if numel else None for x in c["changed"]],
                "consecutive_changed": c["consecutive"], "outside_final": c["outside"],
                "never_updated": frac(c["never"]), "cancelled": frac(c["cancelled"]),
                "final_subnetwork": frac(c["changed"][-1])}

    def _group(self, key, order) -> dict[str, dict]:
        groups: dict[str, list[str]] = {}
        for name in self.tensor_counts:
            groups.setdefault(key(name), []).append(name)
        return {k: self._summary(groups[k]) for k in order(groups)}

    def by_layer(self) -> dict[str, dict]:
        """Per transformer block ("none": tensors outside the blocks): counts and fractions of that group."""
        return self._group(layer_key, sorted_layers)

    def by_type(self) -> dict[str, dict]:
        """Per matrix type (q, k, v, o, gate, up, down, ...): counts and fractions of that group."""
        return self._group(type_of, sorted_types)

    def to_json(self) -> dict:
        n = len(self.checkpoints)
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "series",
            "tool": {"name": "rlsparse", "version": __version__},
            "definitions": {
                "changed": "|new - old| > tolerance on stored values widened to float32 (as rlsparse diff)",
                "sparsity": "fraction of all parameters equal to the base at this checkpoint",
                "consecutive": "sparsity between checkpoint k-1 and k",
                "outside_final": "fraction of all parameters changed vs the base at this checkpoint but "
                                 "unchanged at the final one (Figure 6)",
                "never_updated": "equal to the base at every checkpoint",
                "cancelled": "changed at some checkpoint, equal to the base at the final one",
                "final_subnetwork": "changed at the final checkpoint",
            },
            "base": self.base,
            "tolerance": self.tolerance,
            "numel": self.numel,
            "notes": list(self.notes),
            "never_updated": self.never_updated,
            "cancelled": self.cancelled,
            "final_subnetwork": self.final_subnetwork,
            "ever_updated_outside_final": self.ever_updated_outside_final,
            "checkpoints": [{"path": self.checkpoints[k], "step": self.steps[k], "changed": self.changed[k],
                             "sparsity": self.sparsity[k], "outside_final": self.outside_final_fraction[k]}
                            for k in range(n)],
            "consecutive": [{"from": self.checkpoints[k - 1], "to": self.checkpoints[k],
                             "changed": self.consecutive_changed[k - 1],
                             "sparsity": self.consecutive_sparsity[k - 1]} for k in range(1, n)],
            "by_layer": self.by_layer(),
            "by_type": self.by_type(),
            "bytes_read": self.bytes_read,
            "elapsed_s": self.elapsed_s,
        }


def find_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` folders (as TRL / transformers write them), ordered by step.

    Example:
        >>> find_checkpoints("runs/grpo")  # [runs/grpo/checkpoint-50, runs/grpo/checkpoint-100, ...]
    """
    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder; expected a training output folder with checkpoint-* folders")
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    if not found:
        raise CheckpointError(f"{root}: holds no checkpoint-<step> folders; pass the checkpoints explicitly")
    return [p for _, p in sorted(found)]


def expand_checkpoints(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Replace every folder that holds ``checkpoint-*`` folders by those, in step order.

    A training output folder that also holds weights (the final model a trainer saves next to its
    checkpoints) contributes them last: they are the end of the run.
    """
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir() and any(_STEP.match(c.name) for c in path.iterdir()):
            out.extend(str(c) for c in find_checkpoints(path))
            if _has_weights(path):
                out.append(str(p))
        else:
            out.append(str(p))
    return out


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.index.json"))


def _step_of(path: str) -> int | None:
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def series(base: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], *,
           tolerance: float | str = PAPER_TOLERANCE, progress: bool = False,
           chunk_elements: int | None = None, ray: str | None = None) -> SeriesResult:
    """Sparsity of every checkpoint of a run against its base, between consecutive checkpoints,
    and the never-updated / cancelled / final-subnetwork split, in total, per layer and per type.

    One pass over all checkpoints on the stream engine (each file is read once); FP8
    block-scaled checkpoints are dequantised as in ``rlsparse.diff``.

    Args:
        base: The model the run started from.
        checkpoints: Two or more checkpoints in training order (folders of ``checkpoint-*``
            folders are expanded in step order).
        tolerance: ``|new - old| > tolerance`` counts as changed (paper: 1e-5).
        progress: Show a progress bar on stderr.
        chunk_elements: Elements per chunk and checkpoint (default: bounded memory whatever n).
        ray: Run on a Ray cluster at this address ("local" starts one here); None runs locally.

    Returns:
        SeriesResult.

    Example:
        >>> r = series("Eurus-2-7B-SFT", ["run/checkpoint-40", "run/checkpoint-80", "run/checkpoint-120"])
        >>> r.to_json()["final_subnetwork"], r.by_type()["q"]["final_subnetwork"]
    """
    from rlsparse.diff.kernel import float32_threshold
    from rlsparse.report.progress import progress_bar

    tolerance = check_tolerance(tolerance, "tolerance")
    paths = expand_checkpoints(checkpoints)
    if len(paths) < 2:
        raise UsageError(f"a series needs at least two checkpoints after the base, got {len(paths)}; "
                         "for one checkpoint use `rlsparse diff BASE CHECKPOINT`")
    base_ck = open_checkpoint(base)
    cks = [open_checkpoint(p) for p in paths]
    items = stream_items([(base_ck, ck) for ck in cks], shared_base=True)
    n = len(cks)
    kernel = SeriesKernel(float32_threshold(tolerance), n)
    execute = stream_runner(ray)
    with progress_bar(sum(it.nbytes for it in items), "series", enabled=progress) as advance:
        out = execute(items, kernel, chunk_elements=chunk_elements, advance=advance)
    per_tensor = {it.name: _counts(out.partials.get(i), 3 * n + 1) for i, it in enumerate(items)}
    numel = {it.name: it.numel for it in items}
    total = sum(per_tensor.values()) if per_tensor else np.zeros(3 * n + 1, np.int64)
    c = _split(total, n)
    return SeriesResult(base=base_ck.source, checkpoints=[ck.source for ck in cks],
                        steps=[_step_of(ck.source) for ck in cks], tolerance=tolerance, numel=sum(numel.values()),
                        changed=c["changed"], consecutive_changed=c["consecutive"], outside_final=c["outside"],
                        never=c["never"], cancelled_count=c["cancelled"], tensor_counts=per_tensor,
                        tensor_numel=numel, bytes_read=out.bytes_read, elapsed_s=out.seconds)


@dataclass(frozen=True)
class SeriesKernel:
    """Stream kernel over sources (base, θ_1, ..., θ_n): per chunk, one int64 vector of counts
    ``[changed_1..n, outside_final_1..n, consecutive_2..n, never, cancelled]``; merge adds.

    Set operations run on packed bits (one byte per 8 elements) with popcounts.
    """

    threshold: np.float32
    n: int

    def compute(self, chunk):
        it, raw, sc, n = chunk.item, chunk.raw, chunk.scales, self.n
        codes = [info.dtype for info in it.infos]

        def changed(i: int, j: int) -> np.ndarray:
            return changed_packed(raw[i], raw[j], codes[i], codes[j], self.threshold, sc[i], sc[j], it.cols)

        out = np.zeros(3 * n + 1, dtype=np.int64)
        final = changed(0, n)
        not_final = ~final
        ever = final.copy()
        for k in range(1, n + 1):
            ck = final if k == n else changed(0, k)
            out[k - 1] = popcount(ck)
            out[n + k - 1] = popcount(ck & not_final)
            ever |= ck
            if k > 1:
                out[2 * n + k - 2] = popcount(changed(k - 1, k))
        out[3 * n - 1] = chunk.span.count - popcount(ever)
        out[3 * n] = popcount(ever & not_final)
        return out, None

    def merge(self, acc, partial):
        acc += partial
        return acc


def _counts(partial, size: int) -> np.ndarray:
    return np.zeros(size, np.int64) if partial is None else partial


def _split(v: np.ndarray, n: int) -> dict:
    v = [int(x) for x in v]
    return {"changed": v[:n], "outside": v[n:2 * n], "consecutive": v[2 * n:3 * n - 1], "never": v[3 * n - 1],
            "cancelled": v[3 * n]}
