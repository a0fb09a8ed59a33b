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


def check_writable(path: str | os.PathLike, *, folder_output: bool = False) -> Path:
    """Fail early (before long work) when ``path`` cannot be created.

    ``folder_output=True`` accepts an existing folder at ``path`` (an output folder to be replaced).
    """
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir() and not folder_output:
        raise OutputError(f"{p}: is a folder, expected a file path; give a file name")
    if not folder.is_dir():
        raise OutputError(f"{p}: folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{p}: folder {folder} is not writable; choose another path")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", *, folder_output: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place only on success.

    Works for files and for folders (e.g. a ``save_pretrained`` output); pass
    ``folder_output=True`` to replace an existing output folder.

    Example:
        >>> with atomic_path("out.png", suffix=".png") as tmp:
        ...     fig.savefig(tmp)
    """
    p = check_writable(path, folder_output=folder_output)
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


def write_json(path: str | os.PathLike, doc, *, indent: int = 2, sort_keys: bool = False, allow_nan: bool = False,
               default=None) -> None:
    """Write a JSON document atomically (2-space indent; the keywords are ``json.dumps``'s)."""
    text = json.dumps(doc, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default)
    write_text(path, text + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        tmp.write_text(text, encoding="utf-8")
