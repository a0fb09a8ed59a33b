"""``trained.json``: what a finished training returned, written beside its checkpoint, so that a
resumed run measures a saved checkpoint instead of training it again.

A cell's ``metrics.json`` is written last, after its measurements; a run stopped between the save
and that file used to train the cell again (tens of minutes on the real base). ``trained.json`` is
written atomically right after the checkpoint, and holds the training's log (loss history, step
costs, clip share, sparsity trace), the identity of the cell it belongs to (recipe, learning rate,
seed, start checkpoint hash, data hash, mask hash, step) and the sha256 of the checkpoint's weight
files. ``load`` returns the log only when all of that still matches the folder and the cell: a
checkpoint from another cell, a changed one, or one saved without its record is trained again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rlsparse.io.atomic import write_json
from rlsparse.lab.real import file_sha256

TRAINED_SCHEMA_VERSION = 1
FILE = "trained.json"
# The held-out evaluation of the same checkpoint, under the same rules: a cell trained by a worker
# process is evaluated there once, and the run's assembly pass reads it back.
EVALUATED = "evaluated.json"


def checkpoint_sha256(folder: str | os.PathLike) -> str | None:
    """sha256 over a checkpoint folder's weight files (names and file hashes, in name order); None without weights."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files or not (folder / "config.json").is_file():
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def rows_sha256(rows: list[dict]) -> str:
    """sha256 of a training set (its rows as canonical JSON): the data a cell trained on."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def mask_sha256(mask) -> str | None:
    """sha256 of a ``Mask``'s tensor names, shapes and bits (None for no mask)."""
    if mask is None:
        return None
    h = hashlib.sha256()
    for name in sorted(mask.names):
        bits = mask.get(name).contiguous()
        h.update(f"{name}:{tuple(bits.shape)}\0".encode())
        h.update(bits.numpy().tobytes())
    return h.hexdigest()


def _canonical(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=float))


def save(folder: str | os.PathLike, cell: dict, trained: dict, file: str = FILE) -> None:
    """Record a training's log (or, with ``file=EVALUATED``, its evaluation) beside its just-saved
    checkpoint (atomically, after the checkpoint)."""
    folder = Path(folder)
    write_json(folder / file, {"schema_version": TRAINED_SCHEMA_VERSION, "cell": _canonical(cell),
                               "checkpoint_sha256": checkpoint_sha256(folder), "trained": trained},
               indent=1, sort_keys=True, allow_nan=True, default=float)


def load(folder: str | os.PathLike, cell: dict, file: str = FILE) -> dict | None:
    """The training log of ``folder``'s checkpoint if it is complete and provably this cell's, else None.

    Example:
        >>> trained = load(folder, cell) or train_and_save(...)
    """
    folder = Path(folder)
    path = folder / file
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (not isinstance(record, dict) or record.get("schema_version") != TRAINED_SCHEMA_VERSION
            or record.get("cell") != _canonical(cell) or not isinstance(record.get("trained"), dict)):
        return None
    digest = checkpoint_sha256(folder)
    if digest is None or digest != record.get("checkpoint_sha256"):
        return None
    return record["trained"]
