"""Atomic outputs: nothing half-written is ever left at the destination path.

Every output is written to a temporary file beside its destination, then renamed over it. The
temporary's name says who owns it (``.NAME.rlsparse-PID@HOST-RANDOM.tmp``), so that the next write
to the same destination removes those left by processes that died (``kill -9``, power loss).
Temporaries are created with mode ``0o666`` filtered by the umask, like any other file.

Destinations that are not regular files are never replaced: a symlink is followed (its target is
replaced, the link stays), a character device or FIFO (``/dev/null``, ``/dev/stdout``, ``>(cmd)``)
is written into directly once the output is complete, anything else is refused.

``Outputs`` groups the outputs of one command: their paths are checked against the inputs and
each other before work starts, and they appear together at the end, or none of them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from rlsparse.errors import OutputError, UsageError

_TAG = "rlsparse"
_NAME_KEEP = 80  # characters of the destination's name kept in its temporary's name
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:40] or "host"
_STALE = re.compile(rf"\.{_TAG}-(\d+)@(.+)-[0-9a-f]{{8}}\.tmp(\.[^.]*)?")
# the folder a checkpoint's own files live in: writing new weights there changes what it holds
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth")


def _is_stream(path: str) -> bool:
    """A character device or FIFO: written into directly, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _destination(path: str | os.PathLike) -> Path:
    """The path really written: a symlink's target (the link stays); refuses odd file types."""
    try:
        mode = os.stat(path).st_mode  # follows links: /dev/stdout may lead to a pipe
    except FileNotFoundError:
        return Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise OutputError(f"{path}: the name is too long for this file system; choose a shorter name") from None
        raise OutputError(f"{path}: cannot inspect ({exc.strerror}); choose another path") from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"{path}: is a folder, expected a file path; give a file name")
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return Path(path)  # written into by name, never replaced
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path}: is a block device or socket, not a file; choose a file path")
    return Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)


def check_writable(path: str | os.PathLike, *, folder_output: bool = False) -> Path:
    """Fail early (before long work) when ``path`` cannot be created; returns it as a Path.

    ``folder_output=True`` accepts an existing folder at ``path`` (an output folder to be replaced).
    """
    p = Path(path)
    dest = p if folder_output and p.is_dir() and not p.is_symlink() else _destination(p)
    if _is_stream(str(dest)):
        if not os.access(dest, os.W_OK):
            raise OutputError(f"{p}: is not writable; choose another path")
        return p
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{p}: folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{p}: folder {folder} is not writable; choose another path")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(dest.name)) > name_max:
        raise OutputError(f"{p}: file name is {len(os.fsencode(dest.name))} bytes, this file system allows "
                          f"{name_max}; choose a shorter name")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(dest: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``dest`` left by dead processes of this host; returns what was removed."""
    dest = Path(dest)
    folder = dest.parent if str(dest.parent) else Path(".")
    prefix = f".{dest.name[:_NAME_KEEP]}."
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        m = _STALE.fullmatch(name[len(prefix) - 1:])
        if m is None or m.group(2) != _HOST or _pid_alive(int(m.group(1))):
            continue
        stale = folder / name
        try:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
            removed.append(stale)
        except OSError:
            pass  # another process got there first, or no permission: not ours to insist on
    return removed


def temp_name(dest: str | os.PathLike, suffix: str = ".tmp") -> str:
    """A fresh temporary name for ``dest`` naming this process as its owner."""
    name = Path(dest).name[:_NAME_KEEP]
    extra = "" if suffix in ("", ".tmp") else suffix
    return f".{name}.{_TAG}-{os.getpid()}@{_HOST}-{secrets.token_hex(4)}.tmp{extra}"


def create_temp(dest: str | os.PathLike, suffix: str = ".tmp", *, folder_output: bool = False) -> tuple[int, Path]:
    """Create (exclusively) a temporary file for ``dest`` and open it for writing.

    The file lies beside the real destination (a symlink's target), or in the system temporary
    folder when the destination is a device or FIFO. Its mode is ``0o666`` minus the umask.
    ``folder_output=True`` accepts an existing folder at ``dest`` (an output folder to be replaced).
    """
    p = Path(dest)
    real = p if folder_output and p.is_dir() and not p.is_symlink() else _destination(p)
    folder = Path(tempfile.gettempdir()) if _is_stream(str(real)) else (real.parent if str(real.parent) else Path("."))
    remove_stale(real)
    for _ in range(100):
        tmp = folder / temp_name(real, suffix)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise write_error(dest, exc) from None
        return fd, tmp
    raise OutputError(f"{dest}: could not create a temporary file beside it; choose another folder")


def write_error(path, exc: OSError) -> OutputError:
    """An OSError while writing ``path`` as the one-line error (disk full, quota, read-only...)."""
    hint = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
            errno.EROFS: "the file system is read-only; write elsewhere",
            errno.ENAMETOOLONG: "choose a shorter name"}.get(exc.errno, "choose a writable path")
    return OutputError(f"{path}: cannot write ({exc.strerror or exc}); {hint}")


def commit(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Put the finished temporary ``tmp`` in place of ``dest`` (rename, or copy into a device/FIFO)."""
    real = _destination(dest)
    try:
        if _is_stream(str(real)):
            with open(tmp, "rb") as src, open(real, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            _remove(tmp)
        else:
            os.replace(tmp, real)
    except OSError as exc:
        raise write_error(dest, exc) from None


def _remove(tmp) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", *, folder_output: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; put it in place only on success.

    Works for files and, with ``folder_output=True``, for folders (e.g. a ``save_pretrained``
    output): the temporary path is then free for the caller to create, and an existing output
    folder is replaced.

    Example:
        >>> with atomic_path("out.png", suffix=".png") as tmp:
        ...     fig.savefig(tmp)
    """
    check_writable(path, folder_output=folder_output)
    fd, tmp = create_temp(path, suffix or ".tmp", folder_output=folder_output)
    os.close(fd)
    if folder_output:
        os.unlink(tmp)  # the caller creates the folder; the name stays ours (pid-tagged)
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise write_error(path, exc) from None
            raise
        if folder_output and os.path.isdir(tmp) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        commit(tmp, path)
    finally:
        _remove(tmp)


def write_json(path: str | os.PathLike, doc, *, indent: int = 2, sort_keys: bool = False, allow_nan: bool = False,
               default=None) -> None:
    """Write a JSON document atomically (2-space indent; the keywords are ``json.dumps``'s)."""
    text = json.dumps(doc, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default)
    write_text(path, text + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _resolved(path) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def check_outputs(outputs: Mapping[str, str | os.PathLike | None], inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse, before any work, outputs that would overwrite an input or each other.

    Args:
        outputs: ``{label: path}`` (e.g. ``{"--json": ..., "--save-mask": ...}``); None entries are skipped.
        inputs: the command's input files or checkpoint folders (hub ids and other names that are
            not local paths are skipped).

    Example:
        >>> check_outputs({"--json": "r.json"}, inputs=["base/", "ft/"])
    """
    given = {label: p for label, p in outputs.items() if p is not None}
    for p in given.values():
        check_writable(p)
    real_inputs = [(str(i), _resolved(i)) for i in inputs if os.path.exists(os.path.expanduser(str(i)))]
    seen: dict[str, str] = {}
    for label, p in given.items():
        real = _resolved(p)
        if real in seen and not _is_stream(real):
            raise UsageError(f"{seen[real]} and {label} both write {p}; give each output its own path")
        seen[real] = label
        for shown, inp in real_inputs:
            if real == inp or (os.path.exists(real) and os.path.samefile(real, inp)):
                raise UsageError(f"{label} {p} is the input {shown}; writing it would destroy the input: "
                                 "choose another output path")
            if (os.path.isdir(inp) and real.startswith(inp.rstrip(os.sep) + os.sep)
                    and (real.endswith(_CHECKPOINT_SUFFIXES) or os.path.basename(real) == "config.json")):
                raise UsageError(f"{label} {p} would overwrite or add weights inside the input checkpoint {shown}; "
                                 "write outputs outside the input folders")


def check_output_folder(label: str, folder: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse, before any work, an output folder (e.g. a training ``--output_dir``) that is an
    input folder or directly holds an input file (files written there could replace it)."""
    real = _resolved(folder)
    for inp in inputs:
        if inp is None or not os.path.exists(os.path.expanduser(str(inp))):
            continue
        r = _resolved(inp)
        if real == r or (os.path.isfile(r) and os.path.dirname(r) == real):
            raise UsageError(f"{label} {folder} would write over the input {inp}; choose another output folder")


def same_input(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two input paths name the same file or folder (hub ids: the same id)."""
    ea, eb = os.path.expanduser(str(a)), os.path.expanduser(str(b))
    if os.path.exists(ea) and os.path.exists(eb):
        return os.path.samefile(ea, eb)
    return str(a) == str(b)


class Outputs:
    """The outputs of one command, written to temporaries and put in place together at the end.

    Paths are checked when the object is made (before any work). Inside the ``with`` block,
    ``outputs[label]`` is the temporary path to write (None if that output was not asked for).
    On success every output is put in place; on any error or interrupt none is, and every
    temporary is removed.

    Example:
        >>> with Outputs({"--json": args.json, "--plot": args.plot}, inputs=[args.base]) as out:
        ...     write_json(out["--json"], doc)
    """

    def __init__(self, outputs: Mapping[str, str | os.PathLike | None], inputs: Iterable[str | os.PathLike] = ()):
        check_outputs(outputs, inputs)
        self.paths = {label: p for label, p in outputs.items() if p is not None}
        self._tmp: dict[str, Path] = {}

    def __getitem__(self, label: str) -> Path | None:
        return self._tmp.get(label)

    def __enter__(self) -> "Outputs":
        try:
            for label, p in self.paths.items():
                fd, tmp = create_temp(p, "".join(Path(p).suffixes[-1:]) or ".tmp")
                os.close(fd)
                self._tmp[label] = tmp
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._cleanup()
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise write_error(next(iter(self.paths.values())), exc) from None
            return
        done: list[str] = []
        try:
            for label, p in self.paths.items():
                commit(self._tmp[label], p)
                done.append(f"{label} {p}")
        except BaseException as err:
            self._cleanup()
            if done:
                raise OutputError(f"{err}; already written: {', '.join(done)}") from None
            raise

    def _cleanup(self) -> None:
        for tmp in self._tmp.values():
            _remove(tmp)
