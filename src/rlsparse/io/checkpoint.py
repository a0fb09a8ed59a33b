"""Open any checkpoint layout as one index of tensors: name -> where its bytes are.

Layouts: a Hugging Face folder with sharded safetensors (``model.safetensors.index.json``), a
single ``model.safetensors``, ``pytorch_model*.bin`` (loaded safely, ``weights_only``, memory
mapped), a bare ``.safetensors`` / ``.bin`` file, or a hub id when the path does not exist.
Nothing is read here beyond headers and index files.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from rlsparse.errors import CheckpointError
from rlsparse.io import dtypes
from rlsparse.io.safetensors_format import read_header

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
        return math.prod(self.shape)


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
        if path.is_dir():
            return cls._open_folder(src, path)
        raise CheckpointError(f"{src}: is not a regular file or folder (a FIFO, device or socket); "
                              "expected a model folder or a weights file")

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
        if not os.access(path, os.R_OK | os.X_OK):
            raise CheckpointError(f"{src}: folder is not readable (permission denied); check its permissions")
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index_name).is_file():
                return cls._open_index(src, _inside(path, index_name, path))
        if (path / "model.safetensors").exists():
            single = _inside(path, "model.safetensors", path)
            return cls(src, path, "safetensors", _safetensors_tensors([single]), _config(path))
        st = sorted(_inside(path, p.name, path) for p in path.glob("*.safetensors"))
        if st:
            return cls(src, path, "safetensors-shards", _safetensors_tensors(st), _config(path))
        bins = sorted(_inside(path, p.name, path) for p in path.glob("pytorch_model*.bin"))
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
            weight_map = doc["weight_map"] if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("expected an object with a \"weight_map\" of tensor name -> shard file name")
        except RecursionError:
            raise CheckpointError(f"{index}: not a valid index file (JSON nests too deeply); re-download the model") from None
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid index file ({str(exc)[:160]}); re-download or re-save the model") from None
        folder = index.parent
        shards = sorted(set(weight_map.values()))
        paths = [_inside(folder, s, index) for s in shards]
        missing = [s for s, p in zip(shards, paths) if not p.exists()]
        if missing:
            raise CheckpointError(
                f"{index}: names {len(missing)} shard(s) that are not in {folder} (e.g. {missing[0]}); "
                "download the missing files"
            )
        if index.name.startswith("pytorch_model") or all(p.suffix == ".bin" for p in paths):
            tensors = _bin_tensors(paths)
            layout = "pytorch-index"
        else:
            tensors = _safetensors_tensors(paths)
            layout = "safetensors-index"
        absent = [n for n, s in weight_map.items() if n not in tensors]
        unlisted = sorted(set(tensors) - set(weight_map))
        if absent or unlisted:
            parts = []
            if absent:
                parts.append(f"lists {len(absent)} tensor(s) that its shards do not hold (e.g. {absent[0]})")
            if unlisted:
                parts.append(f"does not list {len(unlisted)} tensor(s) that its shards hold (e.g. {unlisted[0]})")
            raise CheckpointError(f"{index}: " + " and ".join(parts) + "; the shards do not match the index: "
                                  "re-download the model")
        return cls(src, folder, layout, tensors, _config(folder))


def _inside(folder: Path, name: str, source: Path) -> Path:
    """``folder / name``, refused unless it stays inside ``folder``.

    A downloaded index must not make rlsparse open any file on the machine (``../x``, ``/etc/x``,
    or a symlink out). The one exception is the Hugging Face hub cache, whose snapshot folders
    hold symlinks into the repository's own ``blobs`` folder.
    """
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{source}: names the file {name!r}, which is outside {folder}; "
                              "refusing to open it: a checkpoint may only name files inside its folder")
    path = folder / rel
    real, home = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if real == home or home in real.parents or _hub_blob(home, real):
        return path
    raise CheckpointError(f"{path}: links to {real}, outside {folder}; refusing to open it: copy the file into "
                          "the folder, or pass the file itself")


def _hub_blob(snapshot: Path, real: Path) -> bool:
    # <cache>/models--org--name/snapshots/<revision>/file -> <cache>/models--org--name/blobs/<hash>
    repo = snapshot.parent.parent
    return (snapshot.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--"))
            and real.parent == repo / "blobs")


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
            if not isinstance(name, str):
                raise CheckpointError(f"{p}: holds a tensor under the key {name!r} ({type(name).__name__}), "
                                      "expected parameter names (strings); it is not a model state dict")
            try:
                code = dtypes.code_of(t.dtype)
            except ValueError:
                raise CheckpointError(f"{p}: tensor {name!r} has dtype {t.dtype}, which rlsparse cannot read") from None
            if name in out:
                raise CheckpointError(f"{p}: tensor {name!r} is also in {out[name].file}; the shards overlap")
            out[name] = TensorInfo(name, code, tuple(t.shape), p, None, t.numel() * t.element_size())
        del state
    return out


def load_bin(path: Path) -> dict:
    """Load a PyTorch pickle safely (``weights_only``; memory-mapped unless it is the legacy format).

    A pickle that needs anything but tensors and plain containers would run code to load: it
    is refused, never loaded with ``weights_only=False``.
    """
    import pickle
    import zipfile

    import torch

    from rlsparse.io.safetensors_format import open_regular

    os.close(open_regular(path))  # a FIFO or device would block torch.load forever
    legacy = not zipfile.is_zipfile(path)  # before PyTorch 1.6: one pickle stream, no mmap
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's advice (weights_only=False) is not for us
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:
            raise CheckpointError(f"{path}: cannot load as a {_bin_kind(legacy)} (its pickle stream is broken); "
                                  "the file is corrupt: re-download or re-save it") from None
        raise CheckpointError(
            f"{path}: loading this pickle would need code execution (it references {found.group(1)}), so "
            "rlsparse refuses it; convert it to safetensors where you trust its source"
        ) from None
    except Exception as exc:  # torch raises many types for corrupt files
        msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path}: cannot load as a {_bin_kind(legacy)} ({msg}); the file is corrupt or not a state dict"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, expected a state dict of tensors")
    return state


def _bin_kind(legacy: bool) -> str:
    return "legacy (pre-1.6) PyTorch file" if legacy else "PyTorch checkpoint"


def _config(folder: Path) -> dict | None:
    p = folder / "config.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None
    return None


def weight_patterns(files: list[str]) -> list[str]:
    """Which files of a hub repository to fetch: safetensors when it has them, else ``.bin``.

    Example:
        >>> weight_patterns(["config.json", "model.safetensors", "pytorch_model.bin"])
        ['*.safetensors', '*.safetensors.index.json', 'config.json']
    """
    if any(f.endswith(".safetensors") for f in files):
        return ["*.safetensors", "*.safetensors.index.json", "config.json"]
    return ["*.bin", "*.bin.index.json", "config.json"]


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import HfApi, snapshot_download

        files = HfApi().list_repo_files(repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=weight_patterns(files)))
    except Exception as exc:  # offline, unknown repo, auth...
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{repo_id}: not a local path, and fetching it from the hub failed ({msg}); "
            "give a local folder or check the id and your network"
        ) from None
