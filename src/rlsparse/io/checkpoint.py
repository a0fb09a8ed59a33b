"""Open any checkpoint layout as one index of tensors: name -> where its bytes are.

Layouts: a Hugging Face folder with sharded safetensors (``model.safetensors.index.json``), a
single ``model.safetensors``, ``pytorch_model*.bin`` (loaded safely, ``weights_only``, memory
mapped), a bare ``.safetensors`` / ``.bin`` file, or a hub id when the path does not exist.
Nothing is read here beyond headers and index files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from rlsparse.errors import CheckpointError
from rlsparse.io import dtypes
from rlsparse.io.safetensors_format import read_header

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "config.json"]


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives. ``offset`` is None for ``.bin`` files (read via torch)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int | None
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class Checkpoint:
    """The tensor index of one checkpoint.

    Example:
        >>> ck = Checkpoint.open("path/to/model")
        >>> ck.layout, len(ck.tensors), ck.total_bytes
    """

    def __init__(self, source: str, root: Path, layout: str, tensors: dict[str, TensorInfo],
                 config: dict | None):
        self.source = source
        self.root = root
        self.layout = layout
        self.tensors = tensors
        self.config = config or {}

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, layout={self.layout}, tensors={len(self.tensors)})"

    @classmethod
    def open(cls, source: str | os.PathLike) -> "Checkpoint":
        """Resolve ``source`` (folder, file, or hub id) and index its tensors."""
        src = str(source)
        path = Path(src).expanduser()
        if not path.exists():
            if _HUB_ID.match(src) and not src.startswith((".", "/")):
                path = _download(src)
            else:
                raise CheckpointError(
                    f"{src}: no such file or folder; expected a model folder, a .safetensors/.bin file or a hub id"
                )
        if path.is_file():
            return cls._open_file(src, path)
        return cls._open_folder(src, path)

    @classmethod
    def _open_file(cls, src: str, path: Path) -> "Checkpoint":
        if path.suffix == ".safetensors":
            return cls(src, path.parent, "safetensors-file", _safetensors_tensors([path]), _config(path.parent))
        if path.suffix in (".bin", ".pt", ".pth"):
            return cls(src, path.parent, "pytorch-file", _bin_tensors([path]), _config(path.parent))
        if path.name.endswith(".index.json"):
            return cls._open_index(src, path)
        raise CheckpointError(
            f"{src}: file type {path.suffix or '(none)'} is not a checkpoint; expected .safetensors, .bin or an index .json"
        )

    @classmethod
    def _open_folder(cls, src: str, path: Path) -> "Checkpoint":
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index_name).is_file():
                return cls._open_index(src, path / index_name)
        if (path / "model.safetensors").is_file():
            return cls(src, path, "safetensors", _safetensors_tensors([path / "model.safetensors"]), _config(path))
        st = sorted(path.glob("*.safetensors"))
        if st:
            return cls(src, path, "safetensors-shards", _safetensors_tensors(st), _config(path))
        bins = sorted(path.glob("pytorch_model*.bin"))
        if bins:
            return cls(src, path, "pytorch", _bin_tensors(bins), _config(path))
        raise CheckpointError(
            f"{src}: folder holds no model.safetensors, *.safetensors, pytorch_model*.bin or index file; "
            "expected a Hugging Face model folder"
        )

    @classmethod
    def _open_index(cls, src: str, index: Path) -> "Checkpoint":
        try:
            doc = json.loads(index.read_text())
            weight_map = doc["weight_map"]
            if not isinstance(weight_map, dict):
                raise ValueError("weight_map is not an object")
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid index file ({exc}); re-download or re-save the model") from None
        folder = index.parent
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{index}: names {len(missing)} shard(s) that are not in {folder} (e.g. {missing[0]}); "
                "download the missing files"
            )
        paths = [folder / s for s in shards]
        if index.name.startswith("pytorch_model") or all(p.suffix == ".bin" for p in paths):
            tensors = _bin_tensors(paths)
            layout = "pytorch-index"
        else:
            tensors = _safetensors_tensors(paths)
            layout = "safetensors-index"
        absent = [n for n, s in weight_map.items() if n not in tensors]
        if absent:
            raise CheckpointError(
                f"{index}: lists {len(absent)} tensor(s) that its shards do not hold (e.g. {absent[0]}); "
                "the shards do not match the index: re-download the model"
            )
        return cls(src, folder, layout, tensors, _config(folder))


def _safetensors_tensors(paths: list[Path]) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    for p in paths:
        entries, _ = read_header(p)
        for name, e in entries.items():
            if name in out:
                raise CheckpointError(f"{p}: tensor {name!r} is also in {out[name].file}; the shards overlap")
            out[name] = TensorInfo(name, e.dtype, e.shape, p, e.offset, e.nbytes)
    return out


def _bin_tensors(paths: list[Path]) -> dict[str, TensorInfo]:
    import torch

    out: dict[str, TensorInfo] = {}
    for p in paths:
        state = load_bin(p)
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            try:
                code = dtypes.code_of(t.dtype)
            except ValueError:
                raise CheckpointError(f"{p}: tensor {name!r} has dtype {t.dtype}, which rlsparse cannot read") from None
            out[name] = TensorInfo(name, code, tuple(t.shape), p, None, t.numel() * t.element_size())
        del state
    return out


def load_bin(path: Path) -> dict:
    """Load a PyTorch pickle safely (``weights_only``) and memory-mapped."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path}: cannot load as a PyTorch checkpoint ({msg}); the file is corrupt or not a state dict"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, expected a state dict of tensors")
    return state


def _config(folder: Path) -> dict | None:
    p = folder / "config.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None
    return None


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=_WEIGHT_PATTERNS))
    except Exception as exc:  # offline, unknown repo, auth...
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{repo_id}: not a local path, and fetching it from the hub failed ({msg}); "
            "give a local folder or check the id and your network"
        ) from None
