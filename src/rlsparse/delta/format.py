"""The patch file: one safetensors file (no pickle) that describes itself.

Layout (``schema_version`` 1):

- ``__metadata__``: ``format = "rlsparse.delta"``, ``schema_version``, ``rlsparse`` = the
  manifest as JSON (:class:`Manifest`): per tensor its dtype, shape, what to do (``delta``
  against the base tensor of the same name, ``whole`` for tensors stored in full, ``remove``),
  the base tensor's dtype/shape/content hash, the result's hash, the number of changed elements,
  the chunk size and, per chunk, its encoding and coded length; the non-weight files.
- one ``U8`` tensor ``delta/<name>`` per tensor with coded bytes: its chunks' codes, concatenated
  in order (chunk i covers elements ``[i * chunk_elements, (i + 1) * chunk_elements)``);
- one ``U8`` tensor ``file/<name>`` per non-weight file (config, tokenizer...), zstd-compressed.

Hashes are xxh3-128 of a tensor's stored bytes (row-major, little-endian), in hex.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlsparse.errors import PatchError
from rlsparse.io import dtypes
from rlsparse.io.safetensors_format import MAX_HEADER

FORMAT = "rlsparse.delta"
SCHEMA_VERSION = 1
HASH = "xxh3_128"


def new_hasher():
    """The content hash used for base identity and results (streaming ``update``)."""
    from rlsparse.errors import require

    return require("xxhash", "delta").xxh3_128()


@dataclass
class TensorEntry:
    """What the patch holds for one tensor of the result (or one to remove)."""

    name: str
    action: str  # "delta" | "whole" | "remove"
    dtype: str | None = None
    shape: list[int] | None = None
    base_dtype: str | None = None
    base_shape: list[int] | None = None
    base_hash: str | None = None
    hash: str | None = None
    changed: int = 0
    chunk_elements: int = 0
    chunks: list[list[int]] = field(default_factory=list)  # [encoding, coded bytes]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape or []:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return sum(c[1] for c in self.chunks)


@dataclass
class FileEntry:
    name: str
    size: int
    hash: str
    stored: int


@dataclass
class Manifest:
    """The patch's self-description (stored as JSON in the safetensors metadata)."""

    tensors: list[TensorEntry]
    files: list[FileEntry] = field(default_factory=list)
    base: dict = field(default_factory=dict)
    finetuned: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    hash: str = HASH
    tool: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            doc = json.loads(text)
            version = int(doc.get("schema_version", 0))
            if version > SCHEMA_VERSION:
                raise PatchError(
                    f"{where}: patch schema version {version} is newer than this rlsparse reads ({SCHEMA_VERSION}); "
                    "upgrade rlsparse to apply it")
            tensors = [TensorEntry(**t) for t in doc["tensors"]]
            files = [FileEntry(**f) for f in doc.get("files", [])]
            rest = {k: doc[k] for k in ("base", "finetuned", "stats", "hash", "tool") if k in doc}
        except PatchError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise PatchError(f"{where}: patch manifest is malformed ({exc}); the patch is corrupt: re-create it") from None
        if rest.get("hash", HASH) != HASH:
            raise PatchError(f"{where}: patch uses hash {rest['hash']!r}, expected {HASH!r}; upgrade rlsparse")
        return cls(tensors=tensors, files=files, schema_version=version, **rest)


def blob_name(tensor: str) -> str:
    return "delta/" + tensor


def file_blob_name(name: str) -> str:
    return "file/" + name


class PatchWriter:
    """Collect coded blobs (spooled to disk or memory), then write the safetensors patch.

    The header lists every blob with its length, which is known only at the end, so blobs go to
    a spool first and are copied behind the header on ``close``; the patch appears at ``path``
    only on success (temporary file, then rename). With ``path=None`` the patch is built in
    memory and ``close`` returns its bytes.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        if self.path is None:
            self._spool = io.BytesIO()
        else:
            self._spool = tempfile.TemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}.spool")
        self._blobs: list[tuple[str, int]] = []
        self._current: str | None = None
        self._current_size = 0

    def begin(self, name: str) -> None:
        self._end_current()
        self._current, self._current_size = name, 0

    def write(self, data: bytes) -> None:
        self._spool.write(data)
        self._current_size += len(data)

    def _end_current(self) -> None:
        if self._current is not None and self._current_size:
            self._blobs.append((self._current, self._current_size))
        self._current = None

    def close(self, manifest: Manifest) -> bytes | None:
        self._end_current()
        header: dict = {"__metadata__": {"format": FORMAT, "schema_version": str(SCHEMA_VERSION),
                                         "rlsparse": manifest.to_json()}}
        offset = 0
        for name, size in self._blobs:
            header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        if len(raw) > MAX_HEADER:
            raise PatchError(f"patch manifest is {len(raw)} bytes, over the safetensors limit; use a larger chunk size")
        self._spool.seek(0)
        if self.path is None:
            data = struct.pack("<Q", len(raw)) + raw + self._spool.getvalue()
            return data
        from rlsparse.io.atomic import atomic_path

        with atomic_path(self.path) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            while True:
                block = self._spool.read(16 << 20)
                if not block:
                    break
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        self._spool.close()
        return None

    def abort(self) -> None:
        self._spool.close()


class PatchReader:
    """Open a patch (file path or bytes) and read its manifest and coded chunks.

    Example:
        >>> with PatchReader.open("model.rlpatch") as p:
        ...     [t.name for t in p.manifest.tensors]
    """

    def __init__(self, where: str, manifest: Manifest, blobs: dict[str, tuple[int, int]], fd: int | None,
                 data: memoryview | None):
        self.where = where
        self.manifest = manifest
        self._blobs = blobs
        self._fd = fd
        self._data = data
        self.size = sum(n for _, n in blobs.values())

    @classmethod
    def open(cls, source) -> "PatchReader":
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = memoryview(source)
            return cls._parse("patch bytes", bytes(data[:8]), lambda n: bytes(data[8:8 + n]), len(data), None, data)
        path = Path(source)
        if path.is_dir():
            raise PatchError(f"{path}: is a folder, expected a patch file written by `rlsparse delta pack`")
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise PatchError(f"{path}: cannot open the patch ({exc.strerror}); check the path") from None
        try:
            size = os.fstat(fd).st_size
            return cls._parse(str(path), os.pread(fd, 8, 0), lambda n: os.pread(fd, n, 8), size, fd, None)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _parse(cls, where, head, read_header, size, fd, data) -> "PatchReader":
        if len(head) < 8:
            raise PatchError(f"{where}: {size} bytes is too short for a patch; the file is truncated: re-create it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise PatchError(f"{where}: header claims {n} bytes but the patch has {size}; "
                             "the file is truncated or not a patch: re-create it")
        try:
            header = json.loads(read_header(n).decode("utf-8"))
            meta = header.pop("__metadata__")
        except (UnicodeDecodeError, ValueError, KeyError, AttributeError):
            raise PatchError(f"{where}: not a patch written by `rlsparse delta pack` (no valid header)") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise PatchError(f"{where}: safetensors file is not an rlsparse patch (format "
                             f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
        manifest = Manifest.from_json(meta.get("rlsparse", "{}"), where)
        blobs: dict[str, tuple[int, int]] = {}
        start = 8 + n
        for name, spec in header.items():
            try:
                b, e = (int(x) for x in spec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise PatchError(f"{where}: header entry {name!r} is malformed; the patch is corrupt") from None
            if start + e > size or b > e:
                raise PatchError(f"{where}: {name!r} ends at byte {start + e} but the patch has {size}; "
                                 "the file is truncated: re-create it")
            blobs[name] = (start + b, e - b)
        for t in manifest.tensors:
            have = blobs.get(blob_name(t.name), (0, 0))[1]
            if have != t.nbytes:
                raise PatchError(f"{where}: {t.name} has {have} coded bytes, its manifest says {t.nbytes}; "
                                 "the patch is corrupt: re-create it")
            if t.action != "remove" and not dtypes.known(t.dtype or ""):
                raise PatchError(f"{where}: {t.name} has dtype {t.dtype!r}, which this rlsparse cannot write")
        return cls(where, manifest, blobs, fd, data)

    def read_blob(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        start, total = self._blobs.get(name, (0, 0))
        size = total - offset if size is None else size
        if size == 0:
            return b""
        if self._data is not None:
            return bytes(self._data[start + offset:start + offset + size])
        got = os.pread(self._fd, size, start + offset)
        if len(got) != size:
            raise PatchError(f"{self.where}: ended while reading {name}; the file is truncated: re-create it")
        return got

    def chunk_offsets(self, entry: TensorEntry) -> list[int]:
        out, pos = [], 0
        for _, size in entry.chunks:
            out.append(pos)
            pos += size
        return out

    def read_file(self, entry: FileEntry) -> bytes:
        import zstandard

        raw = self.read_blob(file_blob_name(entry.name))
        try:
            data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=entry.size)
        except zstandard.ZstdError:
            raise PatchError(f"{self.where}: stored file {entry.name} is corrupt; re-create the patch") from None
        h = new_hasher()
        h.update(data)
        if len(data) != entry.size or h.hexdigest() != entry.hash:
            raise PatchError(f"{self.where}: stored file {entry.name} does not match its hash; re-create the patch")
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "PatchReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
