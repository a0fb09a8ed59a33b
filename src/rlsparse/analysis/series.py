"""Sparsity along a training run (the paper's Figures 2, 5, 6, 7 and Appendix D).

With base θ_init and checkpoints θ_1..θ_n (in training order), at a tolerance t:
- ``sparsity_k = sparsity(θ_init, θ_k)``: the share of elements equal to the base at step k.
- ``consecutive_k = sparsity(θ_{k-1}, θ_k)`` for k = 2..n: what one interval leaves untouched.
- ``outside_final_k``: the share of all elements changed at step k but unchanged in θ_n
  (Figure 6: updated weights that lie outside the final subnetwork).
- The three-way split of every element (Figure 2): *never updated* (equal to the base at every
  checkpoint), *cancelled* (changed at some checkpoint but equal to the base at θ_n), and the
  *final subnetwork* (changed at θ_n). The three fractions sum to 1.

Memory is bounded by a few chunks whatever n: per chunk, the base and final chunks and two
rolling checkpoint chunks are held.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rlsparse.analysis._common import (CHUNK_ELEMENTS, PAPER_TOLERANCE, SCHEMA_VERSION, changed, check_tolerance,
                                       chunks, open_checkpoint, pair_tensors)
from rlsparse.errors import CheckpointError, MismatchError, UsageError
from rlsparse.io import dtypes
from rlsparse.io.reader import TensorReader

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

    def to_json(self) -> dict:
        from rlsparse import __version__

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


def expand_checkpoints(paths: Sequence[str | os.PathLike], notes: list[str] | None = None) -> list[str]:
    """Replace every folder that holds ``checkpoint-*`` folders by those, in step order.

    A training output folder that also holds weights (the final model a trainer saves next to its
    checkpoints) contributes them last: they are the end of the run. ``checkpoint-<step>`` paths
    given out of step order are sorted by step (a line saying so, and which one is final, is
    appended to ``notes``); out of order beside paths without a step, they are refused.
    """
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir() and any(_STEP.match(c.name) for c in path.iterdir()):
            out.extend(str(c) for c in find_checkpoints(path))
            if _has_weights(path):
                out.append(str(p))
        elif path.is_dir() and not _has_weights(path) and not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: holds no model weights (*.safetensors, *.bin) and no checkpoint-<step> "
                                  "folders; expected a checkpoint folder or a training output folder")
        else:
            out.append(str(p))
    steps = [_step_of(p) for p in out]
    known = [s for s in steps if s is not None]
    if known != sorted(known):
        given = ", ".join(f"{Path(p).name}" for p in out)
        if None in steps:
            raise UsageError(f"checkpoints are not in step order ({given}) and some have no step in their name; "
                             "list them in training order")
        out = [p for _, p in sorted(zip(steps, out), key=lambda sp: sp[0])]
        if notes is not None:
            notes.append(f"checkpoints were given out of step order ({given}); sorted by step, "
                         f"so the final one is {out[-1]}")
    return out


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.index.json"))


def _step_of(path: str) -> int | None:
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def series(base: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], *,
           tolerance: float = PAPER_TOLERANCE, progress: bool = False,
           chunk_elements: int = CHUNK_ELEMENTS) -> SeriesResult:
    """Sparsity of every checkpoint of a run against its base, between consecutive checkpoints,
    and the never-updated / cancelled / final-subnetwork split.

    Args:
        base: The model the run started from.
        checkpoints: Two or more checkpoints in training order (folders of ``checkpoint-*``
            folders are expanded in step order).
        tolerance: ``|new - old| > tolerance`` counts as changed (paper: 1e-5).
        progress: Show a progress bar on stderr.
        chunk_elements: Elements per chunk; memory is a few chunks whatever the number of checkpoints.

    Returns:
        SeriesResult.

    Example:
        >>> r = series("Eurus-2-7B-SFT", ["run/checkpoint-40", "run/checkpoint-80", "run/checkpoint-120"])
        >>> r.to_json()["final_subnetwork"]
    """
    from rlsparse.report.progress import progress_bar

    tolerance = check_tolerance(tolerance)
    paths = expand_checkpoints(checkpoints)
    if len(paths) < 2:
        raise UsageError(f"a series needs at least two checkpoints after the base, got {len(paths)}; "
                         "for one checkpoint use `rlsparse diff BASE CHECKPOINT`")
    base_ck = open_checkpoint(base)
    cks = [open_checkpoint(p) for p in paths]
    plans = []
    problems = []
    for ck in cks:
        try:
            plans.append(pair_tensors(base_ck, ck))
        except MismatchError as exc:
            problems.append(str(exc))
    if problems:
        raise MismatchError(f"{len(problems)} checkpoint(s) do not match the base: " + " | ".join(problems))
    n = len(cks)
    names = list(plans[0])
    numel = sum(plans[0][name][0].numel for name in names)
    chg = np.zeros(n, dtype=np.int64)
    consec = np.zeros(max(n - 1, 0), dtype=np.int64)
    outside = np.zeros(n, dtype=np.int64)
    never = cancelled = 0
    base_reader = TensorReader()
    readers = [TensorReader() for _ in cks]
    max_bytes = 8 * max(chunk_elements, 8)
    bufs = [np.empty(max_bytes, np.uint8) for _ in range(4)]  # base, final, two rolling checkpoints
    total_bytes = sum(sum(p[name][1].nbytes for name in names) for p in plans) + sum(
        plans[0][name][0].nbytes for name in names)
    try:
        with progress_bar(total_bytes, "series", enabled=progress) as advance:
            for name in names:
                ib = plans[0][name][0]
                infos = [p[name][1] for p in plans]
                for start, count in chunks(ib.numel, chunk_elements):
                    b = base_reader.read(ib, start, count, bufs[0])
                    fin = readers[-1].read(infos[-1], start, count, bufs[1])
                    final = changed(b, fin, ib.dtype, infos[-1].dtype, tolerance)
                    ever = final.copy()
                    prev = None
                    for k in range(n):
                        if k == n - 1:
                            cur, ck = fin, final
                        else:
                            cur = readers[k].read(infos[k], start, count, bufs[2 + k % 2])
                            ck = changed(b, cur, ib.dtype, infos[k].dtype, tolerance)
                            ever |= ck
                        chg[k] += int(np.count_nonzero(ck))
                        outside[k] += int(np.count_nonzero(ck & ~final))
                        if prev is not None:
                            consec[k - 1] += int(np.count_nonzero(
                                changed(prev, cur, infos[k - 1].dtype, infos[k].dtype, tolerance)))
                        prev = cur
                    never += count - int(np.count_nonzero(ever))
                    cancelled += int(np.count_nonzero(ever & ~final))
                    advance(count * (dtypes.itemsize(ib.dtype) + sum(dtypes.itemsize(i.dtype) for i in infos)))
    finally:
        base_reader.close()
        for r in readers:
            r.close()
    return SeriesResult(base=base_ck.source, checkpoints=[ck.source for ck in cks],
                        steps=[_step_of(ck.source) for ck in cks], tolerance=tolerance, numel=numel,
                        changed=chg.tolist(), consecutive_changed=consec.tolist(), outside_final=outside.tolist(),
                        never=never, cancelled_count=cancelled)
