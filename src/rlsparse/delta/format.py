"""The patch file: one safetensors file (no pickle) that describes itself.

Layout (``schema_version`` 1 and 2: the same; 2 codes symbol streams with zstd instead of ANS,
see ``codec``), two ``U8`` tensors:

- ``manifest``: the manifest (:class:`Manifest`) as zstd-compressed JSON: per tensor its dtype,
  shape, what to do (``delta`` against the base tensor of the same name, ``whole`` for tensors
  stored in full, ``remove``), the base tensor's dtype/shape/content hash, the result's hash, the
  number of changed elements, the chunk size, where its code starts in ``data`` and, per chunk,
  its encoding and coded length; the non-weight files (name, size, hash, where in ``data``).
- ``data``: every tensor's chunk codes (chunk i covers elements ``[i * chunk_elements,
  (i + 1) * chunk_elements)``), then every non-weight file (config, tokenizer...), zstd-compressed.

``__metadata__`` holds ``format = "rlsparse.delta"`` and ``schema_version``, so a reader can
refuse a file that is not a patch, or is newer than it, before reading anything else.

Hashes are xxh3-128 of a tensor's stored bytes (row-major, little-endian), in hex.
"""

from __future__ import annotations

import bisect
import functools
import io
import json
import os
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlsparse.delta.codec import CODER_VERSION
from rlsparse.errors import PatchError
from rlsparse.io import dtypes
from rlsparse.io.safetensors_format import MAX_HEADER

FORMAT = "rlsparse.delta"
# Written now; every older version is still read (1: ANS symbol coder, 2: zstd symbol coder).
SCHEMA_VERSION = CODER_VERSION
HASH = "xxh3_128"


def new_hasher():
    """The content hash used for base identity and results (streaming ``update``)."""
    return _xxhash().xxh3_128()


@functools.cache
def _xxhash():
    from rlsparse.errors import require

    return require("xxhash", "delta")


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
    offset: int = 0  # where its code starts in ``data``
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
    offset: int = 0


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


_SPOOL_BLOCK = 32 << 20


def header_bytes(metadata: dict[str, str], tensors: list[tuple[str, int]]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file of ``U8`` tensors (name, bytes)."""
    header: dict = {"__metadata__": metadata}
    pos = 0
    for name, size in tensors:
        header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def copy_spool(spool, out, size: int) -> None:
    """Copy the next ``size`` bytes of ``spool`` into ``out`` (binary files; by the kernel where
    both are files on one file system: no pass through this process's memory)."""
    if size and _kernel_copy(spool, out, size):
        return
    while size:
        block = spool.read(min(size, 16 << 20))
        if not block:
            raise OSError(f"spool ended {size} bytes early")
        out.write(block)
        size -= len(block)


def _kernel_copy(spool, out, size: int) -> bool:
    """``copy_spool`` by ``os.copy_file_range``; False (nothing copied) where it cannot be used.

    Measured on the dense synthetic pair's 124 MB of coded data (one pack each, under cProfile):
    0.29 s of CPU to read and write it in 16 MB blocks, 0.05 s this way."""
    if not hasattr(os, "copy_file_range"):
        return False
    try:
        src, dst = spool.fileno(), out.fileno()
    except (AttributeError, io.UnsupportedOperation):  # an in-memory spool
        return False
    out.flush()
    at_src, at_dst = spool.tell(), out.tell()
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src, dst, size - done, at_src + done, at_dst + done)
        except OSError:
            if done:
                raise
            return False  # another file system, or one that cannot: copy through memory
        if n == 0:
            raise OSError(f"spool ended {size - done} bytes early")
        done += n
    spool.seek(at_src + size)
    out.seek(at_dst + size)
    return True


class PatchWriter:
    """Collect coded bytes (spooled to disk or memory), then write the safetensors patch.

    The manifest is known only at the end and goes in front of the data, so the data goes to a
    spool first and is copied behind the header on ``close``; the patch appears at ``path`` only
    on success (temporary file or folder, then rename). With ``path=None`` the patch is built in
    memory and ``close`` returns its bytes. When the data exceeds ``shard_bytes`` the patch is a
    folder of shards instead (``delta.shards``), cut between writes (a chunk never straddles two).
    """

    def __init__(self, path: str | os.PathLike | None, shard_bytes: int | None = None):
        self.path = Path(path) if path is not None else None
        self.shard_bytes = shard_bytes if path is not None else None
        if self.path is None:
            self._spool = io.BytesIO()
        else:
            self._spool = tempfile.TemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}.spool")
        self.offset = 0
        self.cuts: list[int] = []  # data offsets where a new shard starts
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, data: bytes) -> None:
        start = self.cuts[-1] if self.cuts else 0
        if self.shard_bytes and self.offset > start and self.offset - start + len(data) > self.shard_bytes:
            self.cuts.append(self.offset)
        # Collected and written in large blocks: each write to the spool file gives up the GIL,
        # and the thread that feeds the workers then waits for it (measured: 0.1 s of 0.5 s when
        # each chunk's code was written on its own).
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.offset += len(data)
        if self._pending_bytes >= _SPOOL_BLOCK:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._spool.write(b"".join(self._pending))
            self._pending, self._pending_bytes = [], 0

    def close(self, manifest: Manifest) -> bytes | None:
        import zstandard

        packed = zstandard.ZstdCompressor(level=10).compress(manifest.to_json().encode())
        meta = {"format": FORMAT, "schema_version": str(SCHEMA_VERSION)}
        head = header_bytes(meta, [("manifest", len(packed)), ("data", self.offset)])
        self._flush()
        self._spool.seek(0)
        if self.path is None:
            return head + packed + self._spool.getvalue()
        if self.cuts:
            from rlsparse.delta.shards import write_folder

            write_folder(self.path, packed, self._spool, self.offset, self.cuts)
        else:
            from rlsparse.io.atomic import atomic_path

            with atomic_path(self.path, folder_output=self.path.is_dir()) as tmp, open(tmp, "wb") as out:
                out.write(head)
                out.write(packed)
                copy_spool(self._spool, out, self.offset)
                out.flush()
                os.fsync(out.fileno())
                if self.path.is_dir():  # --overwrite of a sharded patch by a single file
                    shutil.rmtree(self.path)
        self._spool.close()
        return None

    def abort(self) -> None:
        self._spool.close()


@dataclass
class Segment:
    """A run of ``data`` held by one file (or bytes): global data offset, size, where it is."""

    offset: int
    size: int
    start: int  # where the run starts in the file (or the bytes)
    fd: int | None = None
    buffer: memoryview | None = None
    label: str = ""


class PatchReader:
    """Open a patch (file, folder of shards, or bytes) and read its manifest and coded chunks.

    Reads are positioned (``os.pread``), so worker threads may share one reader.

    Example:
        >>> with PatchReader.open("model.rlpatch") as p:
        ...     [t.name for t in p.manifest.tensors]
    """

    def __init__(self, where: str, manifest: Manifest, segments: list[Segment]):
        self.where = where
        self.manifest = manifest
        self.segments = segments
        self._starts = [seg.offset for seg in segments]
        self.size = sum(seg.size for seg in segments)
        self._check_entries()

    @classmethod
    def open(cls, source) -> "PatchReader":
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = memoryview(source)
            meta, spans = parse_header("patch bytes", lambda n, at: bytes(data[at:at + n]), len(data))
            _single(meta, "patch bytes")
            manifest = read_manifest("patch bytes", bytes(data[spans["manifest"][0]:sum(spans["manifest"])]))
            start, size = spans["data"]
            return cls("patch bytes", manifest, [Segment(0, size, start, buffer=data, label="patch bytes")])
        path = Path(source)
        if path.is_dir():
            from rlsparse.delta.shards import open_folder

            return open_folder(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise PatchError(f"{path}: cannot open the patch ({exc.strerror}); check the path") from None
        try:
            meta, spans = parse_header(str(path), lambda n, at: os.pread(fd, n, at), os.fstat(fd).st_size)
            _single(meta, str(path))
            m0, msize = spans["manifest"]
            manifest = read_manifest(str(path), os.pread(fd, msize, m0))
            start, size = spans["data"]
            return cls(str(path), manifest, [Segment(0, size, start, fd=fd, label=str(path))])
        except BaseException:
            os.close(fd)
            raise

    def _check_entries(self) -> None:
        for t in self.manifest.tensors:
            if t.offset < 0 or t.offset + t.nbytes > self.size:
                raise PatchError(f"{self.where}: {t.name} needs bytes up to {t.offset + t.nbytes} of the data but it has "
                                 f"{self.size}; the patch is truncated or corrupt: re-create it")
            if t.action != "remove" and not dtypes.known(t.dtype or ""):
                raise PatchError(f"{self.where}: {t.name} has dtype {t.dtype!r}, which this rlsparse cannot write")

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes of ``data`` from ``offset`` (across shards if need be)."""
        if size == 0:
            return b""
        parts = []
        i = bisect.bisect_right(self._starts, offset) - 1
        while size > 0:
            if i < 0 or i >= len(self.segments):
                raise PatchError(f"{self.where}: ended while reading; the patch is truncated: re-create it")
            seg = self.segments[i]
            at = offset - seg.offset
            n = min(size, seg.size - at)
            if seg.buffer is not None:
                got = bytes(seg.buffer[seg.start + at:seg.start + at + n])
            else:
                got = os.pread(seg.fd, n, seg.start + at)
            if len(got) != n:
                raise PatchError(f"{seg.label}: ended while reading; the file is truncated: re-create it")
            parts.append(got)
            offset += n
            size -= n
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def chunk_offsets(self, entry: TensorEntry) -> list[int]:
        """Where each chunk's code starts in ``data``."""
        out, pos = [], entry.offset
        for _, size in entry.chunks:
            out.append(pos)
            pos += size
        return out

    def read_file(self, entry: FileEntry) -> bytes:
        import zstandard

        raw = self.read(entry.offset, entry.stored)
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
        for seg in self.segments:
            if seg.fd is not None:
                os.close(seg.fd)
                seg.fd = None

    def __enter__(self) -> "PatchReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_header(where: str, read, size: int) -> tuple[dict, dict[str, tuple[int, int]]]:
    """Check that a file is an rlsparse patch (or one shard of one) that this version reads; returns
    its ``__metadata__`` and (start in the file, size) of each of its tensors."""
    head = read(8, 0)
    if len(head) < 8:
        raise PatchError(f"{where}: {size} bytes is too short for a patch; the file is truncated: re-create it")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise PatchError(f"{where}: header claims {n} bytes but the patch has {size}; "
                         "the file is truncated or not a patch: re-create it")
    try:
        header = json.loads(read(n, 8).decode("utf-8"))
        meta = header.get("__metadata__")
    except (UnicodeDecodeError, ValueError, AttributeError):
        raise PatchError(f"{where}: not a patch written by `rlsparse delta pack` (no valid header)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PatchError(f"{where}: safetensors file is not an rlsparse patch (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    try:
        version = int(meta.get("schema_version", "0"))
    except ValueError:
        version = 0
    if version > SCHEMA_VERSION:
        raise PatchError(f"{where}: patch schema version {version} is newer than this rlsparse reads "
                         f"({SCHEMA_VERSION}); upgrade rlsparse to apply it")
    spans = {}
    for name in ("manifest", "data"):
        if name == "manifest" and name not in header and "shard" in meta:
            continue  # only the first shard of a sharded patch holds the manifest
        try:
            b, e = (int(x) for x in header[name]["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise PatchError(f"{where}: header has no valid {name!r} entry; the patch is corrupt: re-create it") from None
        if 8 + n + e > size or b > e:
            raise PatchError(f"{where}: {name!r} ends at byte {8 + n + e} but the file has {size}; "
                             "the file is truncated: re-create it")
        spans[name] = (8 + n + b, e - b)
    return meta, spans


def _single(meta: dict, where: str) -> None:
    if "shard" in meta:
        raise PatchError(f"{where}: is shard {meta.get('shard')} of {meta.get('shards')} of a sharded patch; "
                         "give the folder that holds its shards and index")


def read_manifest(where: str, packed: bytes) -> Manifest:
    import zstandard

    try:
        text = zstandard.ZstdDecompressor().decompress(packed, max_output_size=MAX_HEADER)
    except zstandard.ZstdError:
        raise PatchError(f"{where}: the manifest is corrupt; re-create the patch") from None
    return Manifest.from_json(text.decode("utf-8", "replace"), where)
