"""``rlsparse.delta.apply``: rebuild the finetuned model from its base and a patch.

To a folder: the base streams through the shared engine (``diff.stream``) with ``ApplyKernel``:
on a worker, each span of the base is hashed, decoded in place in the engine's buffer,
hashed again and written at its place in the output shard (``StreamingSafetensorsWriter.write_at``,
no copy, no waiting for its turn); the hashes come back in order and are checked per tensor.
A large output (``DIRECT_WRITES_FROM``) is written with O_DIRECT instead: each span is decoded
from a map of the base into a buffer of its own and written by a thread of the worker while
the worker decodes the next (``io.write_behind``).
The workers are forked processes (``diff.forked``; they inherit the open output shards and
``pwrite`` into them) for large enough checkpoints, else threads: ``parallel`` chooses, as for
``pack``.
Everything is written into a temporary folder that is renamed into place only when every hash
matched. In memory: ``apply_to_state_dict`` and
``apply_to_module`` first check every base hash (nothing is touched on a wrong base), then
decode in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlsparse.delta import codec, compiled
from rlsparse.delta.format import PatchReader, TensorEntry, new_hasher
from rlsparse.delta.pack import chunk_digest, use_processes
from rlsparse.delta.sources import tensor_bits
from rlsparse.diff import forked, stream
from rlsparse.errors import MismatchError, OutputError, PatchError
from rlsparse.io import dtypes
from rlsparse.io.checkpoint import Checkpoint
from rlsparse.io.memory import PAGE
from rlsparse.io.write_behind import WriteBehind

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Output from this size up is written with O_DIRECT (``direct=None``). Measured on this machine
# (bench/delta_apply_writes.py, 2026-11-29): at 0.27 GB the page cache was as fast or faster
# (best 0.25 vs 0.31 s), at 0.78 GB O_DIRECT was faster (0.56 vs 0.68 s; median 0.95 vs 2.21 s)
# and at 1.7 GB far faster (1.14 vs 4.29 s, CPU 2.05 vs 6.41 s): the page-cache copy of fresh
# pages costs ~1-4 s of CPU per GB here, and dirty pages pile up ahead of the closing fsync.
DIRECT_WRITES_FROM = 512 << 20
WRITE_BEHIND_DEPTH = 3  # chunks being written per process while the next is decoded


@dataclass
class ApplyResult:
    """What ``apply`` wrote."""

    path: Path
    tensors: int
    bytes_written: int
    seconds: float
    shards: int
    direct: bool = False  # the weights' whole pages went out with O_DIRECT


def open_patch(patch) -> tuple[PatchReader, bool]:
    """(reader, whether we opened it and must close it)."""
    if isinstance(patch, PatchReader):
        return patch, False
    return PatchReader.open(patch), True


def spans_of(e: TensorEntry) -> list[tuple[int, int]]:
    """(start, count) of each coded chunk of an entry, as ``pack`` cut them."""
    if e.numel == 0:
        return [(0, 0)]
    step = e.chunk_elements or e.numel
    return [(s, min(step, e.numel - s)) for s in range(0, e.numel, step)]


def check_base(manifest, base: dict[str, tuple[str, tuple[int, ...]]], where: str, whole_set: bool = True) -> None:
    """Refuse a base whose tensor names, dtypes or shapes differ from what the patch was made
    against (cheap: no data read). ``base`` maps name -> (dtype code, shape)."""
    problems = []
    expected = set()
    for e in manifest.tensors:
        if e.base_dtype is None:
            if whole_set and e.name in base:
                problems.append(f"{e.name} is in the base but the patch adds it as new")
            continue
        expected.add(e.name)
        got = base.get(e.name)
        if got is None:
            problems.append(f"{e.name} is missing from the base")
        elif got[0] != e.base_dtype or list(got[1]) != list(e.base_shape):
            problems.append(f"{e.name} is {got[0]}{list(got[1])} in the base, the patch expects "
                            f"{e.base_dtype}{list(e.base_shape)}")
    if whole_set:
        extra = sorted(set(base) - expected - {e.name for e in manifest.tensors})
        problems += [f"{n} is in the base but not in the patch's base" for n in extra[:1]]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MismatchError(f"{where}: this is not the base the patch was made against: first difference: "
                            f"{problems[0]}{more}; apply the patch to the base it was packed from")


def _wrong_base(where: str, name: str) -> MismatchError:
    return MismatchError(f"{where}: this is not the base the patch was made against: first differing tensor: "
                         f"{name} (content hash differs); apply the patch to the base it was packed from")


def _corrupt(where: str, name: str) -> PatchError:
    return PatchError(f"{where}: {name} decodes to data whose hash differs from the recorded result; "
                      "the patch is corrupt: re-create it")


class ApplyKernel:
    """Stream kernel: decode one span of one tensor against the base's bits (in place) and, with
    an ``output``, write the result at its place there."""

    def __init__(self, patch: PatchReader, entries: list[TensorEntry], output: "_ShardedOutput | None" = None):
        self.patch = patch
        self.entries = entries
        self.output = output
        # the C kernels where they were built (no start-up cost), else None: numpy
        self.compiled = compiled.KERNELS
        self.offsets = [patch.chunk_offsets(e) for e in entries]
        self._wb: WriteBehind | None = None
        self._lock = threading.Lock()

    def decode(self, i: int, start: int, count: int, old: np.ndarray | None, *, inplace: bool = False,
               hash_old: bool = True) -> tuple[np.ndarray, bytes | None, bytes]:
        """(new bits, digest of ``old`` or None, digest of the new bits) of one chunk; ``inplace``
        writes the new bits over ``old``."""
        e = self.entries[i]
        k = start // e.chunk_elements if e.chunk_elements else 0
        if k >= len(e.chunks):
            raise PatchError(f"{self.patch.where}: {e.name} has {len(e.chunks)} chunks, expected more; the patch is corrupt")
        enc, size = e.chunks[k]
        data = self.patch.read(self.offsets[i][k], size)
        dig_old = chunk_digest(old) if old is not None and hash_old else None
        udt = dtypes.uint_view(e.dtype)
        new = codec.decode_chunk(enc, data, old, count, udt, e.dtype in dtypes.FLOAT_CODES,
                                 f"{self.patch.where}: {e.name} chunk {k}", inplace=inplace,
                                 version=self.patch.manifest.schema_version, compiled=self.compiled)
        if new.size != count:
            raise _corrupt(self.patch.where, e.name)
        same = enc == codec.SAME and dig_old is not None  # the same bits: the same digest
        return new, dig_old, dig_old if same else chunk_digest(new)

    def compute(self, chunk: stream.Chunk):
        s = chunk.span
        e = self.entries[s.item]
        start = s.start * dtypes.itemsize(e.dtype)
        old = chunk.raw[0] if chunk.raw else None
        if old is None or not self.output.direct:
            # decoded in place in the engine's buffer and written before the buffer goes back
            new, dig_old, dig_new = self.decode(s.item, s.start, s.count, old, inplace=True)
            self.output.write_at(e.name, start, new)
        else:
            # O_DIRECT: the base chunk (a read-only view of the page cache) is copied into a
            # write-behind buffer placed at its output offset's phase, decoded there and handed to
            # the write thread (whole pages go out uncopied), which writes it while the next chunk
            # is decoded: a direct write waits for the disk
            wb = self._write_behind()
            buf = wb.buffer(old.nbytes, self.output.data_offset(e.name, start) % PAGE).view(old.dtype)
            np.copyto(buf, old)
            new, dig_old, dig_new = self.decode(s.item, s.start, s.count, buf, inplace=True)
            wb.submit(self.output.write_at, e.name, start, new, buffer=buf)
        return None, (dig_old, dig_new, new.nbytes)

    def _write_behind(self) -> WriteBehind:
        """This process's write thread (a forked worker starts its own)."""
        with self._lock:
            if self._wb is None or self._wb.pid != os.getpid():
                self._wb = WriteBehind(depth=WRITE_BEHIND_DEPTH)
            return self._wb

    def flush(self) -> None:
        """Wait for this process's writes (``stream.run`` calls it before it returns)."""
        wb = self._wb
        if wb is not None and wb.pid == os.getpid():
            wb.flush()

    def merge(self, acc, partial):
        return None


class _ShardedOutput:
    """The output folder's shards: every shard is open from the start and takes positional
    writes, so workers write their chunks wherever they are in the layout."""

    def __init__(self, folder: Path, entries: list[TensorEntry], max_shard_bytes: int, direct: bool | None = False):
        from rlsparse.io.safetensors_format import StreamingSafetensorsWriter

        self.total = sum(e.numel * dtypes.itemsize(e.dtype) for e in entries)
        self.direct = self.total >= DIRECT_WRITES_FROM if direct is None else direct

        groups: list[list[TensorEntry]] = [[]]
        size = 0
        for e in entries:
            nbytes = e.numel * dtypes.itemsize(e.dtype)
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += nbytes
        n = len(groups)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._writers = []
        self._by_name = {}
        self.weight_map = {}
        for name, group in zip(self.names, groups):
            layout = [(e.name, e.dtype, tuple(e.shape)) for e in group]
            w = StreamingSafetensorsWriter(folder / name, layout, direct=self.direct)
            w.metadata = {"format": "pt"}
            self._writers.append(w)
            for e in group:
                self.weight_map[e.name] = name
                self._by_name[e.name] = w
        self._open: list = []  # writers entered and not yet closed

    def __enter__(self) -> "_ShardedOutput":
        try:
            for w in self._writers:
                w.__enter__()
                self._open.append(w)
        except BaseException:
            self.abort()
            raise
        return self

    def write_at(self, name: str, start: int, bits: np.ndarray) -> None:
        self._by_name[name].write_at(name, start, bits)

    def data_offset(self, name: str, start: int) -> int:
        return self._by_name[name].data_offset(name, start)

    def count_written(self, name: str, nbytes: int) -> None:
        """Bytes of ``name`` a forked worker wrote with ``write_at`` (its own copy counted them)."""
        self._by_name[name].count_written(nbytes)

    def finish(self, folder: Path) -> None:
        while self._open:
            self._open.pop(0).__exit__(None, None, None)
        if len(self.names) > 1:
            (folder / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, indent=2))

    def abort(self) -> None:
        while self._open:
            self._open.pop().__exit__(OutputError, OutputError("aborted"), None)


def apply(base, patch, out: str | os.PathLike, *, overwrite: bool = False,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, workers: int = 2, progress: bool = False,
          parallel: str = "auto", direct: bool | None = None) -> ApplyResult:
    """Write ``base`` + ``patch`` as a Hugging Face folder at ``out``, bit-identical to the
    finetuned model the patch was packed from.

    Args:
        base: The base checkpoint (any layout ``Checkpoint.open`` reads).
        patch: Patch file path, bytes or an open ``PatchReader``.
        out: Output folder; must not exist unless ``overwrite``.
        overwrite: Replace an existing ``out`` (only once the new folder is complete).
        max_shard_bytes: Split the weights into shards of at most this size (plus an index).
        workers: Decoding processes or threads.
        progress: Progress bar on stderr.
        parallel: "processes", "threads" or "auto", as for ``pack`` (the bits written are the
            same either way).
        direct: Write the output's whole pages with O_DIRECT (True), through the page cache
            (False), or O_DIRECT from ``DIRECT_WRITES_FROM`` bytes of output up (None). The
            files are the same either way; O_DIRECT spares the CPU the page-cache copy.

    Returns:
        ApplyResult

    Example:
        >>> rlsparse.delta.apply("base/", "step30.rlpatch", "step30/")
    """
    from rlsparse.report.progress import progress_bar

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; choose another folder or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose a folder path")
    reader, close = open_patch(patch)
    ck = base if isinstance(base, Checkpoint) else Checkpoint.open(base)
    try:
        m = reader.manifest
        check_base(m, {n: (t.dtype, t.shape) for n, t in ck.tensors.items()}, reader.where)
        deltas = [e for e in m.tensors if e.action == "delta"]
        wholes = [e for e in m.tensors if e.action == "whole"]
        try:
            with _atomic_folder(out) as tmp:
                output = _ShardedOutput(tmp, deltas + wholes, max_shard_bytes, direct=direct).__enter__()
                try:
                    with progress_bar(output.total, "apply", enabled=progress) as advance:
                        procs = use_processes(parallel, workers, output.total)
                        _write_deltas(ck, reader, deltas, output, workers, advance, procs, tmp)
                        _write_wholes(reader, wholes, output, workers, advance)
                    output.finish(tmp)
                except BaseException:
                    output.abort()
                    raise
                for f in m.files:
                    (tmp / f.name).write_bytes(reader.read_file(f))
        except OSError as exc:
            raise OutputError(f"{out}: writing failed ({exc.strerror or exc}); nothing was left behind: "
                              "free space or choose another folder") from None
        except OutputError as exc:
            # The shared writers name the temporary file they failed on; say it of the folder asked for.
            found = re.search(r": cannot write \((.+?)\);", str(exc))
            if found is None:
                raise
            raise OutputError(f"{out}: writing failed ({found.group(1)}); nothing was left behind: "
                              "free space or choose another folder") from None
    finally:
        if close:
            reader.close()
    return ApplyResult(out, len(deltas) + len(wholes), output.total, time.perf_counter() - t0, len(output.names),
                       output.direct)


@contextlib.contextmanager
def _atomic_folder(out: Path):
    """A temporary folder next to ``out``, moved into place on success (an existing ``out`` is
    replaced only then); removed on failure, so no half-written folder is ever left."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{out}: folder {parent} does not exist; create it or choose another path")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write in {parent} ({exc.strerror}); choose a writable folder") from None
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_deltas(ck: Checkpoint, reader: PatchReader, deltas, output: _ShardedOutput, workers, advance,
                  processes: bool = False, spool_dir: Path | None = None) -> None:
    if not deltas:
        return
    kernel = ApplyKernel(reader, deltas, output)
    items = [stream.Item(e.name, (ck.tensors[e.name],)) for e in deltas]
    spans = [stream.Span(i, s, c, 0, s == 0, s + c >= e.numel)
             for i, e in enumerate(deltas) for s, c in spans_of(e)]
    hashers: list = [None, None]

    def sink(span: stream.Span, piece) -> None:
        dig_old, dig_new, nbytes = piece
        e = deltas[span.item]
        if span.first:
            hashers[:] = [new_hasher(), new_hasher()]
        hashers[0].update(dig_old)
        hashers[1].update(dig_new)
        if processes:
            output.count_written(e.name, nbytes)
        else:
            advance(nbytes)
        if span.last:
            if hashers[0].hexdigest() != e.base_hash:
                raise _wrong_base(reader.where, e.name)
            if hashers[1].hexdigest() != e.hash:
                raise _corrupt(reader.where, e.name)

    # direct writes decode from read-only maps of the base into their own buffers; cached ones in
    # place in the engine's (a copy from a map costs page faults a read into a buffer does not)
    if processes:
        forked.run_forked(items, kernel, spans=spans, workers=workers, sink=sink, advance=advance, label="apply",
                          spool_dir=spool_dir, mapped=output.direct)
    else:
        stream.run(items, kernel, spans=spans, workers=workers, sink=sink, mapped=output.direct)


def _write_wholes(reader: PatchReader, wholes, output: _ShardedOutput, workers, advance) -> None:
    kernel = ApplyKernel(reader, wholes)

    def one(i: int, start: int, count: int) -> tuple[bytes, int]:
        e = wholes[i]
        new, _, dig = kernel.decode(i, start, count, None)
        output.write_at(e.name, start * dtypes.itemsize(e.dtype), new)
        return dig, new.nbytes

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, e in enumerate(wholes):
            h = new_hasher()
            for dig, nbytes in pool.map(lambda sc: one(i, *sc), spans_of(e)):
                h.update(dig)
                advance(nbytes)
            if h.hexdigest() != e.hash:
                raise _corrupt(reader.where, e.name)


def apply_to_state_dict(state_dict: dict, patch, *, workers: int = 2) -> dict:
    """Apply a patch to ``{name: tensor}`` in place (tensors the patch adds or resizes are
    replaced, removed ones deleted); returns the same dict.

    Every base hash is checked before anything changes, so a wrong base leaves the state dict
    untouched; each result is checked against its recorded hash.

    Example:
        >>> sd = model.state_dict()
        >>> rlsparse.delta.apply_to_state_dict(sd, "step30.rlpatch")
    """
    import torch

    reader, close = open_patch(patch)
    try:
        m = reader.manifest
        check_base(m, {n: (dtypes.code_of(t.dtype), tuple(t.shape)) for n, t in state_dict.items()},
                   reader.where, whole_set=False)
        deltas = [e for e in m.tensors if e.action == "delta"]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for e in deltas:  # pass 1: identity, before any write
                bits = tensor_bits(state_dict[e.name])
                h = new_hasher()
                for dig in pool.map(lambda sc: chunk_digest(bits[sc[0]:sc[0] + sc[1]]), spans_of(e)):
                    h.update(dig)
                if h.hexdigest() != e.base_hash:
                    raise _wrong_base(reader.where, e.name)
            kernel = ApplyKernel(reader, deltas)
            done: set[int] = set()
            for i, e in enumerate(deltas):  # pass 2: decode in place
                t = state_dict[e.name]
                bits = tensor_bits(t)
                key = t.data_ptr() if t.numel() else None
                if key in done:  # an alias of a tensor already written (tied weights)
                    continue
                shared = t.device.type == "cpu" and t.is_contiguous() and t.numel() > 0
                h = new_hasher()

                out = bits if shared else bits.copy()

                def one(sc, out=out, i=i):
                    return kernel.decode(i, sc[0], sc[1], out[sc[0]:sc[0] + sc[1]], inplace=True, hash_old=False)[2]

                for dig in pool.map(one, spans_of(e)):
                    h.update(dig)
                if h.hexdigest() != e.hash:
                    raise _corrupt(reader.where, e.name)
                if not shared:
                    with torch.no_grad():
                        t.copy_(_as_tensor(out, e).to(t.device))
                if key is not None:
                    done.add(key)
        for e in m.tensors:
            if e.action == "whole":
                kernel = ApplyKernel(reader, [e])
                h = new_hasher()
                parts = []
                for s, c in spans_of(e):
                    new, _, dig = kernel.decode(0, s, c, None)
                    parts.append(new)
                    h.update(dig)
                if h.hexdigest() != e.hash:
                    raise _corrupt(reader.where, e.name)
                bits = np.concatenate(parts) if parts else np.empty(0, dtypes.uint_view(e.dtype))
                state_dict[e.name] = _as_tensor(bits, e)
            elif e.action == "remove":
                state_dict.pop(e.name, None)
    finally:
        if close:
            reader.close()
    return state_dict


def _as_tensor(bits: np.ndarray, e: TensorEntry):
    import torch

    size = dtypes.itemsize(e.dtype)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    signed = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[size]
    t = torch.from_numpy(np.ascontiguousarray(bits).view(signed).copy()).view(ints)
    return t.view(dtypes.torch_dtype(e.dtype)).reshape(e.shape)


def apply_to_module(module, patch, *, workers: int = 2):
    """Apply a patch to a ``torch.nn.Module``'s parameters and buffers in place.

    The patch must not add, remove or resize tensors (a module cannot change its parameters);
    tied weights are written once.

    Example:
        >>> rlsparse.delta.apply_to_module(model, "step30.rlpatch")
    """
    reader, close = open_patch(patch)
    try:
        bad = [e.name for e in reader.manifest.tensors if e.action != "delta"]
        if bad:
            raise PatchError(f"{reader.where}: the patch adds, removes or resizes {len(bad)} tensor(s) (e.g. {bad[0]}); "
                             "a module cannot change its parameters: apply it to a folder or a state dict")
        apply_to_state_dict(module.state_dict(keep_vars=False), reader, workers=workers)
    finally:
        if close:
            reader.close()
    return module
