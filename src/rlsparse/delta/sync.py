"""Sparse weight sync: a trainer ships only what changed to its inference copies.

The sender keeps the last weights it sent, as the stored bits of the dtype the inference side
uses (e.g. bf16); each ``sync`` packs the patch from those to the current weights, so what
crosses the wire is exactly the elements whose inference-dtype bits changed. Every patch
carries the content hash of the weights it expects and of the weights it produces; the receiver
checks both, so a receiver that drifted (missed a sync, was modified) is refused, never
silently corrupted. Transports (``delta.transport``) only move bytes.

Example:
    >>> sender = SyncSender(model)                 # both sides start from the same weights
    >>> receiver = SyncReceiver(inference_model)
    >>> payload, report = sender.sync(model)       # after some optimizer steps
    >>> receiver.receive(payload)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlsparse.delta.apply import apply, apply_to_state_dict, open_patch
from rlsparse.delta.pack import DEFAULT_CHUNK_ELEMENTS, pack
from rlsparse.delta.sources import StateDictSource
from rlsparse.io import dtypes


@dataclass
class SyncReport:
    """One sync: what changed, what was sent, and how long coding took."""

    step: int
    tensors: int
    numel: int
    changed: int
    bytes_sent: int
    full_bf16_bytes: int
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """How many times smaller than broadcasting every weight in bf16."""
        return self.full_bf16_bytes / self.bytes_sent if self.bytes_sent else float("inf")

    @property
    def density(self) -> float:
        return self.changed / self.numel if self.numel else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "density": self.density}


def snapshot(weights, dtype: str | None = "bf16") -> dict:
    """``{name: CPU tensor in dtype}`` of a module or state dict; tied (aliased) tensors once."""
    import torch

    sd = weights.state_dict() if hasattr(weights, "state_dict") else weights
    target = dtypes.torch_dtype(dtypes.parse_user_dtype(dtype)) if dtype else None
    out: dict = {}
    seen: set[tuple[int, tuple]] = set()
    with torch.no_grad():
        for name, t in sd.items():
            key = (t.data_ptr(), tuple(t.shape), t.dtype)
            if t.numel() and key in seen:
                continue
            seen.add(key)
            cast = t.detach().to(device="cpu", dtype=target if (target is not None and t.is_floating_point()) else t.dtype)
            out[name] = cast.clone() if cast.data_ptr() == t.data_ptr() else cast.contiguous()
    return out


class SyncSender:
    """Trainer side: ``sync(model)`` returns the patch since the last sync and its report.

    Args:
        weights: The module or state dict the receivers start from (their current copy).
        dtype: The inference side's dtype (floating tensors are cast to it before comparing).
        chunk_elements: Elements per coded span.
        workers: Coding threads.
    """

    def __init__(self, weights, dtype: str | None = "bf16", *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                 workers: int = 2):
        self.dtype = dtype
        self.chunk_elements = chunk_elements
        self.workers = workers
        self.step = 0
        self._last = snapshot(weights, dtype)

    def sync(self, weights) -> tuple[bytes, SyncReport]:
        t0 = time.perf_counter()
        current = snapshot(weights, self.dtype)
        self.step += 1
        res = pack(StateDictSource(self._last, f"sync {self.step - 1}"), StateDictSource(current, f"sync {self.step}"),
                   None, chunk_elements=self.chunk_elements, workers=self.workers, files=False)
        self._last = current
        numel = res.numel
        report = SyncReport(self.step, len(current), numel, res.changed, res.patch_bytes, 2 * numel,
                            encode_seconds=time.perf_counter() - t0)
        return res.data, report


class SyncReceiver:
    """Inference side: applies each payload to its copy (module, state dict or safetensors folder).

    ``receive`` checks the base hash of every tensor first (a drifted copy is refused with
    ``MismatchError`` and left untouched) and each result's hash after decoding.
    """

    def __init__(self, target, *, workers: int = 2):
        self.target = target
        self.workers = workers
        self.step = 0

    def receive(self, payload: bytes) -> SyncReport:
        t0 = time.perf_counter()
        reader, _ = open_patch(payload)
        m = reader.manifest
        if isinstance(self.target, (str, Path)):
            apply(self.target, reader, self.target, overwrite=True, workers=self.workers)
        elif hasattr(self.target, "state_dict"):
            from rlsparse.delta.apply import apply_to_module

            apply_to_module(self.target, reader, workers=self.workers)
        else:
            apply_to_state_dict(self.target, reader, workers=self.workers)
        self.step += 1
        return _received(self.step, m, len(m.tensors), len(payload), t0)


class LoadWeightsReceiver:
    """Adapter for engines that take new weights through ``load_weights(iterable of (name, tensor))``
    (vLLM's model runner path): keeps a CPU mirror of the weights in the inference dtype,
    applies each patch to it (hash-checked), then hands ``load_weights`` only the tensors whose
    bits changed.

    Not run against vLLM here (no GPU, no vLLM in the test environment): tested against a fake
    engine that records what ``load_weights`` receives.

    Example:
        >>> rx = LoadWeightsReceiver(llm_model.load_weights, hf_state_dict)
        >>> rx.receive(payload)
    """

    def __init__(self, load_weights, state_dict: dict, dtype: str | None = "bf16", *, workers: int = 2):
        self.load_weights = load_weights
        self.mirror = snapshot(state_dict, dtype)
        self.workers = workers
        self.step = 0

    def receive(self, payload: bytes) -> SyncReport:
        t0 = time.perf_counter()
        reader, _ = open_patch(payload)
        m = reader.manifest
        apply_to_state_dict(self.mirror, reader, workers=self.workers)
        names = [e.name for e in m.tensors if (e.action == "delta" and e.changed) or e.action == "whole"]
        self.load_weights((n, self.mirror[n]) for n in names)
        self.step += 1
        return _received(self.step, m, len(names), len(payload), t0)


def _received(step: int, manifest, tensors: int, payload_bytes: int, t0: float) -> SyncReport:
    """The receiver's report of one applied patch (elements after the patch vs a full bf16 broadcast)."""
    numel = sum(e.numel for e in manifest.tensors if e.action != "remove")
    changed = sum(e.changed for e in manifest.tensors if e.action == "delta")
    return SyncReport(step, tensors, numel, changed, payload_bytes, 2 * numel,
                      decode_seconds=time.perf_counter() - t0)
