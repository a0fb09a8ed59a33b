"""The one mask type and file format shared by every rlsparse command.

File format (``schema_version`` 1): a safetensors file. Each parameter ``name`` is stored as a
1-D ``U8`` tensor of ``ceil(numel / 8)`` bytes: the parameter's elements in row-major order,
bit-packed little-endian (element ``i`` is bit ``i % 8`` of byte ``i // 8``), 1 = in the
subnetwork (changed). ``__metadata__`` holds ``format = "rlsparse.mask"``, ``schema_version``
and ``rlsparse``: a JSON document with the tool version, the inputs, the tolerance, every
tensor's shape and count of ones, and the totals (see ``MaskMeta``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: `rlsparse diff` never needs it
    import torch

from rlsparse._version import __version__
from rlsparse.errors import MaskError, MismatchError, tensor_set_differences
from rlsparse.io.safetensors_format import StreamingSafetensorsWriter, read_header

FORMAT = "rlsparse.mask"
SCHEMA_VERSION = 1


@dataclass
class MaskMeta:
    """What a mask file records about itself."""

    shapes: dict[str, list[int]]
    counts: dict[str, int]
    tolerance: float | None = None
    base: str | None = None
    finetuned: str | None = None
    tool_version: str = ""
    schema_version: int = SCHEMA_VERSION
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes.values())

    @property
    def ones(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> str:
        doc = asdict(self)
        doc["total_numel"] = self.numel
        doc["total_ones"] = self.ones
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "MaskMeta":
        doc = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in doc.items() if k in known})


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def pack(bits) -> np.ndarray:
    """Bool elements (torch or numpy, any shape, row-major) -> packed little-endian bytes."""
    arr = bits if isinstance(bits, np.ndarray) else bits.detach().cpu().numpy()
    return np.packbits(np.ascontiguousarray(arr, dtype=bool).reshape(-1), bitorder="little")


def unpack(packed: np.ndarray, shape):
    """Packed bytes -> bool torch tensor of ``shape``."""
    import torch

    n = _numel(shape)
    bits = np.unpackbits(packed, count=n, bitorder="little").view(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))


class Mask:
    """A subnetwork: for each parameter name, which elements belong to it (True = changed).

    Loaded lazily: ``get`` reads one tensor from disk when asked. Built in memory with
    ``Mask.from_tensors``.

    Example:
        >>> mask = Mask.load("sub.mask.safetensors")
        >>> mask.density, mask.get("model.layers.0.self_attn.q_proj.weight").sum()
    """

    def __init__(self, meta: MaskMeta, path: Path | None = None,
                 tensors: Mapping[str, torch.Tensor] | None = None):
        self.meta = meta
        self.path = path
        self._tensors = dict(tensors) if tensors is not None else None

    # construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Mask":
        """Open a mask file written by rlsparse; fails with MaskError if it is not one."""
        p = Path(path)
        if not p.is_file():
            raise MaskError(f"{p}: no such mask file; pass the path written by `rlsparse diff --save-mask`")
        try:
            entries, metadata = read_header(p)
        except Exception as exc:  # a CheckpointError from the reader reads oddly for a mask
            raise MaskError(f"{p}: not a readable mask file ({exc})") from None
        if metadata.get("format") != FORMAT:
            raise MaskError(
                f"{p}: safetensors file without rlsparse mask metadata (format={metadata.get('format')!r}); "
                "expected a file written by `rlsparse diff --save-mask`"
            )
        version = int(metadata.get("schema_version", "0"))
        if version < 1 or version > SCHEMA_VERSION:
            raise MaskError(
                f"{p}: mask schema_version {version}, this rlsparse reads 1..{SCHEMA_VERSION}; upgrade rlsparse"
            )
        try:
            meta = MaskMeta.from_json(metadata["rlsparse"])
        except (KeyError, ValueError, TypeError) as exc:
            raise MaskError(f"{p}: mask metadata is corrupt ({exc}); re-create the mask") from None
        for name, shape in meta.shapes.items():
            e = entries.get(name)
            if e is None or e.dtype != "U8" or e.shape != ((_numel(shape) + 7) // 8,):
                raise MaskError(f"{p}: tensor {name!r} is missing or has the wrong packed size; re-create the mask")
        return cls(meta, path=p)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], **meta) -> "Mask":
        """An in-memory mask from bool tensors (any nonzero value counts as True)."""
        bools = {k: (v != 0).detach().to("cpu") for k, v in tensors.items()}
        m = MaskMeta(
            shapes={k: list(v.shape) for k, v in bools.items()},
            counts={k: int(v.sum()) for k, v in bools.items()},
            **meta,
        )
        return cls(m, tensors=bools)

    # queries ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.meta.shapes)

    def __contains__(self, name: str) -> bool:
        return name in self.meta.shapes

    def __len__(self) -> int:
        return len(self.meta.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta.shapes[name])

    def count(self, name: str) -> int:
        """Number of elements of ``name`` in the subnetwork."""
        return int(self.meta.counts[name])

    @property
    def numel(self) -> int:
        return self.meta.numel

    @property
    def ones(self) -> int:
        return self.meta.ones

    @property
    def density(self) -> float:
        """Fraction of all elements in the subnetwork (changed)."""
        return self.ones / self.numel if self.numel else 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of all elements outside the subnetwork (unchanged)."""
        return 1.0 - self.density

    def packed(self, name: str) -> np.ndarray:
        """The packed bytes of one tensor (see the module docstring for the bit order)."""
        if name not in self.meta.shapes:
            raise MaskError(f"mask has no tensor {name!r}")
        if self._tensors is not None:
            return pack(self._tensors[name])
        from safetensors import safe_open

        with safe_open(str(self.path), framework="np") as f:
            return f.get_tensor(name)

    def get(self, name: str, device: str | torch.device | None = None) -> torch.Tensor:
        """Bool tensor of the parameter's shape; True = in the subnetwork."""
        if name not in self.meta.shapes:
            raise MaskError(f"mask has no tensor {name!r}; it has {len(self)} tensors, e.g. {self.names[:3]}")
        if self._tensors is not None:
            t = self._tensors[name]
        else:
            t = unpack(self.packed(name), self.meta.shapes[name])
        return t.to(device) if device is not None else t

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.get(name)

    def check_compatible(self, other: "Mask", what: str = "masks") -> None:
        """Raise MismatchError unless ``other`` covers the same tensors with the same shapes."""
        parts = tensor_set_differences(self.meta.shapes, other.meta.shapes, str(self.path or "the first"),
                                       str(other.path or "the second"))
        if parts:
            raise MismatchError(
                f"{what} do not describe the same model: " + "; ".join(parts)
                + "; use masks made against the same base model"
            )

    # writing ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the mask atomically in the rlsparse mask format."""
        with MaskWriter(path, {n: tuple(s) for n, s in self.meta.shapes.items()}) as w:
            for name in self.names:
                w.write(name, self.packed(name))
            w.set_meta(self.meta)


class MaskWriter:
    """Streams a mask file tensor by tensor, in the order of ``shapes``; atomic on exit.

    Example:
        >>> with MaskWriter(path, {"w": (4, 8)}) as w:
        ...     w.write("w", pack(bits))          # may be called several times per tensor
        ...     w.set_meta(MaskMeta(shapes={"w": [4, 8]}, counts={"w": int(bits.sum())}))
    """

    def __init__(self, path: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]]):
        self._shapes = dict(shapes)
        layout = [(n, "U8", ((_numel(s) + 7) // 8,)) for n, s in self._shapes.items()]
        # counts are known only at the end: reserve room in the header for each ("name": count,)
        # and 8 KiB for the other metadata
        shapes_json = len(json.dumps({n: list(s) for n, s in self._shapes.items()}))
        counts_json = sum(len(n) + 28 for n in self._shapes)
        self._w = StreamingSafetensorsWriter(path, layout, reserve_metadata=shapes_json + counts_json + 8192)
        self._meta: MaskMeta | None = None

    def __enter__(self) -> "MaskWriter":
        self._w.__enter__()
        return self

    def write(self, name: str, packed: np.ndarray | bytes) -> None:
        self._w.write(name, np.ascontiguousarray(packed, dtype=np.uint8) if not isinstance(packed, bytes) else packed)

    def set_meta(self, meta: MaskMeta) -> None:
        if meta.shapes.keys() != self._shapes.keys():
            raise MismatchError("mask metadata names differ from the tensors written")
        meta.tool_version = meta.tool_version or __version__
        self._meta = meta

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._meta is None:
                raise RuntimeError("MaskWriter closed without set_meta()")
            self._w.metadata = {
                "format": FORMAT,
                "schema_version": str(SCHEMA_VERSION),
                "rlsparse": self._meta.to_json(),
            }
        self._w.__exit__(exc_type, exc, tb)


def load_mask(path: str | os.PathLike) -> Mask:
    """Open a mask file; shorthand for ``Mask.load``."""
    return Mask.load(path)
