"""The safetensors container: header parsing with clear errors, and a streaming writer.

The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header length N,
N bytes of JSON (``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
may be padded with spaces), then the data buffer that the offsets index.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from rlsparse.errors import CheckpointError, OutputError
from rlsparse.io import dtypes
from rlsparse.io.atomic import check_writable, commit, create_temp, write_error

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class RawEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, RawEntry], dict[str, str]]:
    """Parse and validate a safetensors header; returns (entries by name, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: file is {size} bytes, too short for a safetensors header; "
                    "expected 8 length bytes then JSON; the file is truncated or not safetensors"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header claims {n} bytes but the file has {size}; "
                    "the file is truncated or not safetensors: re-download or re-save it"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: safetensors header is not valid JSON ({exc}); the file is corrupt: re-download or re-save it"
        ) from None
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries: dict[str, RawEntry] = {}
    for name, spec in header.items():
        try:
            code = spec["dtype"]
            shape = tuple(int(s) for s in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry {name!r} is malformed; the file is corrupt") from None
        if not dtypes.known(code):
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {code!r}, which rlsparse cannot read")
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtypes.itemsize(code) or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but {code}{list(shape)} needs "
                f"{numel * dtypes.itemsize(code)}; the file is corrupt"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size}; "
                "the file is truncated: re-download or re-save it"
            )
        entries[name] = RawEntry(name, code, shape, data_start + begin, end - begin)
    return entries, {str(k): str(v) for k, v in meta.items()}


class StreamingSafetensorsWriter:
    """Write a safetensors file whose layout is known upfront, tensor data streamed in order.

    The header is written first with room reserved for metadata that is only known at the end
    (``reserve_metadata`` bytes); the file appears at ``path`` only when the context exits
    without error (written to a temporary file in the same folder, then renamed).

    Example:
        >>> with StreamingSafetensorsWriter(p, [("a", "U8", (4,))]) as w:
        ...     w.write("a", b"\\x01\\x02\\x03\\x04")
        ...     w.metadata = {"k": "v"}
    """

    def __init__(self, path: str | os.PathLike, layout: list[tuple[str, str, tuple[int, ...]]],
                 reserve_metadata: int = 4096):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._layout = layout
        self._reserve = reserve_metadata
        self._order = [name for name, _, _ in layout]
        self._next = 0
        self._written_in_current = 0
        self._sizes = {}
        header: dict[str, dict] = {}
        offset = 0
        for name, code, shape in layout:
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * dtypes.itemsize(code)
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes[name] = nbytes
            offset += nbytes
        self._tensor_header = header
        self._fh = None
        self._tmp: str | None = None

    def _header_bytes(self, metadata: dict[str, str], pad_to: int | None) -> bytes:
        doc = {"__metadata__": metadata, **self._tensor_header}
        raw = json.dumps(doc, separators=(",", ":")).encode()
        target = pad_to if pad_to is not None else len(raw) + self._reserve
        target = (target + 7) // 8 * 8
        if len(raw) > target:
            raise OutputError(f"{self.path}: metadata grew past its reserved {target} bytes (internal limit)")
        return raw + b" " * (target - len(raw))

    def __enter__(self) -> "StreamingSafetensorsWriter":
        check_writable(self.path)
        fd, self._tmp = create_temp(self.path)
        self._fh = os.fdopen(fd, "wb")
        self._hlen = len(self._header_bytes(self.metadata, None))
        try:
            self._fh.write(b"\0" * (8 + self._hlen))
        except OSError as exc:
            self.__exit__(type(exc), exc, None)
            raise write_error(self.path, exc) from None
        return self

    def write(self, name: str, data) -> None:
        """Append bytes of tensor ``name``; tensors come in layout order, each possibly in pieces."""
        # empty tensors need no bytes: step over them
        while (self._next < len(self._order) and self._order[self._next] != name
               and self._sizes[self._order[self._next]] == 0 and self._written_in_current == 0):
            self._next += 1
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise RuntimeError(f"writer expected {expected}, got {name}")
        mv = memoryview(data).cast("B")
        try:
            self._fh.write(mv)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        self._written_in_current += mv.nbytes
        if self._written_in_current > self._sizes[name]:
            raise RuntimeError(f"{name}: wrote {self._written_in_current} bytes, expected {self._sizes[name]}")
        if self._written_in_current == self._sizes[name]:
            self._next += 1
            self._written_in_current = 0

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                while self._next < len(self._order) and self._sizes[self._order[self._next]] == 0:
                    self._next += 1
                if self._next != len(self._order):
                    raise RuntimeError(f"writer closed before {self._order[self._next]} was written")
                header = self._header_bytes(self.metadata, self._hlen)
                try:
                    self._fh.seek(0)
                    self._fh.write(struct.pack("<Q", len(header)))
                    self._fh.write(header)
                    self._fh.flush()
                    os.fsync(self._fh.fileno())
                    self._fh.close()
                except OSError as exc:
                    raise write_error(self.path, exc) from None
                commit(self._tmp, self.path)
                self._tmp = None
        finally:
            if self._fh and not self._fh.closed:
                with contextlib.suppress(OSError):
                    self._fh.close()
            if self._tmp and os.path.lexists(self._tmp):
                os.unlink(self._tmp)
            self._tmp = None
