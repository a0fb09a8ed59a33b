"""Helpers shared by the analyses: stream items for several runs (the stream engine does the
reading), popcount, tolerances, grouping by layer and type, choosing matrices (rank, spectral)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from rlsparse.diff.tolerance import PAPER_TOLERANCE, parse_tolerance  # noqa: F401 (the analyses' default)
from rlsparse.errors import MismatchError, UsageError, tensor_set_differences
from rlsparse.io.checkpoint import Checkpoint, TensorInfo
from rlsparse.io.naming import layer_of, type_of, type_sort_key

SCHEMA_VERSION = 1
CHUNK_ELEMENTS = 256 * 1024  # mask overlap: elements per chunk of packed bytes (a multiple of 8: whole bytes)
_EMBEDDING_TYPES = ("embed", "pos_embed", "lm_head")

try:
    _bitwise_count = np.bitwise_count
except AttributeError:  # numpy < 2
    _LUT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _bitwise_count(x: np.ndarray) -> np.ndarray:
        return _LUT[x]


def popcount(packed: np.ndarray) -> int:
    """Number of set bits in a uint8 array."""
    return int(_bitwise_count(packed).sum(dtype=np.int64))


def open_checkpoint(source: str | os.PathLike | Checkpoint) -> Checkpoint:
    return source if isinstance(source, Checkpoint) else Checkpoint.open(source)


def pair_tensors(base: Checkpoint, other: Checkpoint) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    """Tensors of two checkpoints matched by clean name, for the whole-matrix views (rank,
    spectral); MismatchError (all problems at once) when names or shapes differ. Ordered as
    stored (file, offset) so reads stay sequential. The streamed analyses use ``stream_items``."""
    from rlsparse.diff.plan import plan

    p = plan(base, other)
    scaled = [pair.name for pair in p.pairs if pair.base_scale is not None or pair.finetuned_scale is not None]
    if scaled:
        # comparing raw FP8 codes without their block scales would silently change the meaning
        raise UsageError(
            f"{base.source} vs {other.source}: {len(scaled)} FP8 tensor(s) with block scales (e.g. {scaled[0]}); "
            "rank and spectral do not dequantise them yet (diff, series, overlap and precision do); "
            "dequantise to bf16 first")
    return {pair.name: (pair.base, pair.finetuned) for pair in p.pairs}


def stream_items(runs: Sequence[tuple[Checkpoint, Checkpoint]], *, shared_base: bool):
    """Stream items (``diff.stream.Item``) for the tensors of several (base, finetuned) runs.

    With ``shared_base`` (a series: one base, many checkpoints) the sources are
    ``(base, ft_1, ..., ft_n)``; otherwise ``(base_1, ft_1, base_2, ft_2, ...)`` (the engine reads a
    base shared by several runs once). Every run is planned by ``diff.plan`` (FP8 block scales
    included); all mismatches are collected and raised once as MismatchError. Items are in the
    storage order of the first run.
    """
    from rlsparse.diff.plan import plan
    from rlsparse.diff.stream import Item

    plans, problems = [], []
    for base, ft in runs:
        try:
            plans.append(plan(base, ft))
        except MismatchError as exc:
            problems.append(str(exc))
    if problems:
        raise MismatchError(f"{len(problems)} checkpoint(s) do not match the base: " + " | ".join(problems))
    by_name = [{p.name: p for p in pl.pairs} for pl in plans]
    names = [p.name for p in plans[0].pairs]
    for i, pairs in enumerate(by_name[1:], start=1):
        parts = tensor_set_differences({n: by_name[0][n].base.shape for n in names},
                                       {n: p.base.shape for n, p in pairs.items()},
                                       runs[0][0].source, runs[i][0].source)
        if parts:
            raise MismatchError("the runs do not start from the same base model: " + "; ".join(parts)
                                + "; compare runs finetuned from the same base model")
    items = []
    for name in names:
        ps = [pairs[name] for pairs in by_name]
        if shared_base:
            infos = (ps[0].base, *(p.finetuned for p in ps))
            scales = (ps[0].base_scale, *(p.finetuned_scale for p in ps))
        else:
            infos = tuple(x for p in ps for x in (p.base, p.finetuned))
            scales = tuple(x for p in ps for x in (p.base_scale, p.finetuned_scale))
        items.append(Item(name, infos, scales if any(sc is not None for sc in scales) else ()))
    return items


def stream_runner(ray: str | None):
    """``diff.stream.run``, or the Ray runner when ``ray`` is an address (or "local")."""
    from rlsparse.diff import stream

    if ray is None:
        return stream.run
    from rlsparse.diff.distributed import ray_runner

    return ray_runner(ray)


def layer_key(name: str) -> str:
    """JSON key of a tensor's layer: the block index, or "none" outside the blocks."""
    layer = layer_of(name)
    return "none" if layer is None else str(layer)


def group_summaries(items, key, order, summary) -> dict[str, dict]:
    """Group ``items`` by ``key(item)``, summarise each group, keys in ``order(keys)``."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return {k: summary(groups[k]) for k in order(groups)}


class MatrixGroups:
    """Mixin for results holding ``matrices`` (objects with ``name`` and ``type``) and a
    ``_summary(list) -> dict``: per-type and per-layer summaries."""

    def by_type(self) -> dict[str, dict]:
        return group_summaries(self.matrices, lambda m: m.type, sorted_types, self._summary)

    def by_layer(self) -> dict[str, dict]:
        return group_summaries(self.matrices, lambda m: layer_key(m.name), sorted_layers, self._summary)


def sorted_layers(keys) -> list[str]:
    return sorted(keys, key=lambda k: (k == "none", int(k) if k != "none" else 0))


def sorted_types(keys) -> list[str]:
    return sorted(keys, key=type_sort_key)


def check_tolerance(t: float | str, param: str = "tolerance") -> float:
    """``t`` as a float, or UsageError naming ``param``."""
    return parse_tolerance(t, param)


def select_matrices(pairs: dict[str, tuple[TensorInfo, TensorInfo]], *, include_embeddings: bool = False,
                    layers: Sequence[int] | None = None, max_matrices: int | None = None) -> tuple[list[str], list[str]]:
    """The 2-D float matrices to analyse, in (layer, type) order, and notes on what was left out.

    ``max_matrices`` keeps that many, evenly spaced over the ordered list (deterministic).
    """
    from rlsparse.io.dtypes import FLOAT_CODES

    notes = []
    names = [n for n, (a, _) in pairs.items() if len(a.shape) == 2 and a.dtype in FLOAT_CODES]
    skipped_1d = len(pairs) - len(names)
    if skipped_1d:
        notes.append(f"skipped {skipped_1d} tensor(s) that are not 2-D float matrices (norms, biases)")
    if not include_embeddings:
        emb = [n for n in names if type_of(n) in _EMBEDDING_TYPES]
        if emb:
            names = [n for n in names if n not in emb]
            notes.append(f"skipped {len(emb)} embedding/lm_head matrices (include_embeddings=True adds them)")
    if layers is not None:
        wanted = set(layers)
        names = [n for n in names if layer_of(n) in wanted]
        notes.append(f"only layers {','.join(str(x) for x in sorted(wanted))}")
    names.sort(key=lambda n: (layer_of(n) is None, layer_of(n) or 0, type_sort_key(type_of(n)), n))
    if max_matrices is not None:
        if max_matrices < 1:
            raise UsageError(f"max_matrices={max_matrices}: must be at least 1")
        if len(names) > max_matrices:
            idx = np.unique(np.round(np.linspace(0, len(names) - 1, max_matrices)).astype(int))
            notes.append(f"sampled {len(idx)} of {len(names)} matrices, evenly spaced (max_matrices={max_matrices})")
            names = [names[i] for i in idx]
    if not names:
        raise UsageError("no 2-D matrices left to analyse; check layers= / include_embeddings=")
    return names, notes


@dataclass
class MatrixWalk:
    """What ``walk_matrices`` yields: both checkpoints, notes so far, and the matrices to visit."""

    base: Checkpoint
    finetuned: Checkpoint
    notes: list[str]
    items: Iterator[tuple[str, TensorInfo, TensorInfo, object]]  # (name, base, finetuned, TensorReader)


@contextlib.contextmanager
def walk_matrices(base, finetuned, *, include_embeddings: bool, layers, max_matrices, progress: bool,
                  what: str) -> Iterator[MatrixWalk]:
    """Open both checkpoints, select the 2-D matrices (sampling options), and visit them one at a
    time with one reader and a progress bar (rank and spectral views)."""
    from rlsparse.io.reader import TensorReader
    from rlsparse.report.progress import progress_bar

    a, b = open_checkpoint(base), open_checkpoint(finetuned)
    pairs = pair_tensors(a, b)
    names, notes = select_matrices(pairs, include_embeddings=include_embeddings, layers=layers,
                                   max_matrices=max_matrices)
    with TensorReader() as reader, progress_bar(len(names), what, unit="matrices", enabled=progress) as advance:
        def items():
            for name in names:
                yield name, pairs[name][0], pairs[name][1], reader
                advance(1)

        yield MatrixWalk(a, b, notes, items())


def resolve_device(device: str | None) -> str:
    """``device`` or, when None, "cuda" if a GPU is present else "cpu"; UsageError if unusable."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={device!r}: no CUDA device is available here; use device='cpu'")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"device={device!r}: not usable ({str(exc).splitlines()[0]}); use cpu or cuda") from None
    return device


def ratio(num: int | float, den: int | float) -> float | None:
    """num / den, or None when den is 0 (the quantity is undefined)."""
    return num / den if den else None
