"""Where pack and apply read tensors from: a checkpoint on disk or tensors in memory.

Both give the same thing, a stored tensor's raw bits (unsigned ints of the dtype's width) for an
element range, so the chunk loop does not care whether it streams a 70B checkpoint or walks a
trainer's parameters.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlsparse.io import dtypes
from rlsparse.io.checkpoint import Checkpoint, TensorInfo
from rlsparse.io.reader import TensorReader

# top-level files of a model folder that are weights (not copied into a patch as files)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".msgpack", ".h5")


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in dtypes.FLOAT_CODES


class CheckpointSource:
    """Tensors of a checkpoint, read in element ranges through one ``TensorReader``."""

    def __init__(self, source):
        self.checkpoint = source if isinstance(source, Checkpoint) else Checkpoint.open(source)
        self.label = self.checkpoint.source
        infos = sorted(self.checkpoint.tensors.values(), key=lambda t: (str(t.file), t.offset or 0, t.name))
        self._infos: dict[str, TensorInfo] = {t.name: t for t in infos}
        self.tensors = {t.name: StoredTensor(t.name, t.dtype, tuple(t.shape)) for t in infos}
        self._reader = TensorReader()

    def read(self, name: str, start: int, count: int) -> np.ndarray:
        return self._reader.read(self._infos[name], start, count)

    def files(self) -> list[Path]:
        """Non-weight files at the top of the checkpoint's folder (config, tokenizer, ...)."""
        root = self.checkpoint.root
        if self.checkpoint.layout in ("safetensors-file", "pytorch-file"):
            return [root / "config.json"] if (root / "config.json").is_file() else []
        return sorted(p for p in root.iterdir()
                      if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_WEIGHT_SUFFIXES))

    def close(self) -> None:
        self._reader.close()


class StateDictSource:
    """Tensors of an in-memory ``{name: torch.Tensor}`` (any device; copied to CPU once each)."""

    def __init__(self, state_dict: dict, label: str = "state dict"):
        self.label = label
        self._tensors = state_dict
        self._bits: dict[str, np.ndarray] = {}
        self.tensors = {}
        for name, t in state_dict.items():
            self.tensors[name] = StoredTensor(name, dtypes.code_of(t.dtype), tuple(t.shape))

    def bits(self, name: str) -> np.ndarray:
        """The flattened raw bits of one tensor (a view where the tensor is a contiguous CPU one)."""
        got = self._bits.get(name)
        if got is None:
            got = tensor_bits(self._tensors[name])
            self._bits = {name: got}  # keep one: memory stays bounded by the largest tensor
        return got

    def read(self, name: str, start: int, count: int) -> np.ndarray:
        return self.bits(name)[start:start + count]

    def files(self) -> list[Path]:
        return []

    def close(self) -> None:
        self._bits = {}


def tensor_bits(t) -> np.ndarray:
    """A torch tensor's stored bits as a flat unsigned numpy array (no copy for contiguous CPU)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    size = t.element_size()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return t.view(ints).numpy().view(dtypes.uint_view(dtypes.code_of(t.dtype)))


def open_source(source):
    """A checkpoint path/Checkpoint, or a ``{name: tensor}`` dict."""
    if isinstance(source, (CheckpointSource, StateDictSource)):
        return source
    if isinstance(source, dict):
        return StateDictSource(source)
    if isinstance(source, (str, os.PathLike, Checkpoint)):
        return CheckpointSource(source)
    raise TypeError(f"cannot read tensors from {type(source).__name__}; give a checkpoint path or a state dict")
