"""Atomic outputs: nothing half-written is ever left at the destination path."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from rlsparse.errors import OutputError


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before long work) when ``path`` cannot be created."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OutputError(f"{p}: is a folder, expected a file path; give a file name")
    if not folder.is_dir():
        raise OutputError(f"{p}: folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{p}: folder {folder} is not writable; choose another path")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place only on success.

    Works for files and for folders (e.g. a ``save_pretrained`` output).

    Example:
        >>> with atomic_path("out.png", suffix=".png") as tmp:
        ...     fig.savefig(tmp)
    """
    p = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix or ".tmp", dir=p.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        yield Path(tmp)
        if os.path.isdir(tmp) and os.path.isdir(p):
            shutil.rmtree(p)
        os.replace(tmp, p)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, doc) -> None:
    """Write a JSON document atomically (sorted keys off, 2-space indent)."""
    text = json.dumps(doc, indent=2, allow_nan=False)
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(text + "\n")
