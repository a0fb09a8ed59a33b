"""Apply's per-byte floor: ways to turn a base file into an output file, CPU seconds side by side.

``delta apply`` must read every base byte (to hash it: the base's identity), write every output
byte and hash it (the result's check). This measures, on one file and without any decoding,
what each way of moving the bytes costs (least CPU of ``--repeat``, each into a fresh file):

- ``read+write``: ``preadv`` a chunk into one buffer, hash it, touch one byte a page (the
  decode's stand-in), hash again, ``pwrite`` it (what apply does today, less the decode);
- ``read+write, 4 buffers``: the same through 4 buffers in turn (a read-ahead pool);
- ``copy_file_range`` / ``sendfile``: the kernel copies the bytes (no hashing, no patching:
  the lower bound of a kernel-side copy);
- ``copy_file_range + mmap``: kernel copy, hash the base through a read-only map, patch the
  output through a shared map (one byte a page) and hash it there.

    python bench/delta_copy_paths.py /tmp/delta-real/step-1/model.safetensors --repeat 5
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import time

import numpy as np

CHUNK = 8 << 20  # bytes: one 4M-element bf16 chunk, as pack cuts them


def _hash():
    import xxhash

    return xxhash.xxh3_128_digest


def read_write(src: str, dst: str, buffers: int = 1) -> None:
    digest = _hash()
    n = os.path.getsize(src)
    bufs = [bytearray(CHUNK) for _ in range(buffers)]
    fi, fo = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        off, i = 0, 0
        while off < n:
            buf = bufs[i % buffers]
            i += 1
            mv = memoryview(buf)[:min(CHUNK, n - off)]
            k = os.preadv(fi, [mv], off)
            digest(mv[:k])
            np.frombuffer(buf, dtype=np.uint8)[:k:4096] += 1
            digest(mv[:k])
            os.pwrite(fo, mv[:k], off)
            off += k
    finally:
        os.close(fi)
        os.close(fo)


def kernel_copy(src: str, dst: str, how: str) -> None:
    n = os.path.getsize(src)
    fi, fo = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        off = 0
        while off < n:
            k = min(CHUNK, n - off)
            if how == "copy_file_range":
                k = os.copy_file_range(fi, fo, k, off, off)
            else:
                os.lseek(fo, off, os.SEEK_SET)
                k = os.sendfile(fo, fi, off, k)
            off += k
    finally:
        os.close(fi)
        os.close(fo)


def copy_and_map(src: str, dst: str) -> None:
    digest = _hash()
    n = os.path.getsize(src)
    fi, fo = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fo, n)
    base = mmap.mmap(fi, 0, prot=mmap.PROT_READ)
    try:
        off = 0
        while off < n:
            k = min(CHUNK, n - off)
            digest(memoryview(base)[off:off + k])
            os.copy_file_range(fi, fo, k, off, off)
            out = mmap.mmap(fo, k, offset=off)  # CHUNK is a multiple of the page size
            view = np.frombuffer(out, dtype=np.uint8)
            view[::4096] += 1
            digest(out)
            del view
            out.close()
            off += k
    finally:
        base.close()
        os.close(fi)
        os.close(fo)


WAYS = {
    "read+write": lambda s, d: read_write(s, d),
    "read+write, 4 buffers": lambda s, d: read_write(s, d, buffers=4),
    "copy_file_range": lambda s, d: kernel_copy(s, d, "copy_file_range"),
    "sendfile": lambda s, d: kernel_copy(s, d, "sendfile"),
    "copy_file_range + mmap": copy_and_map,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", help="a large file (a checkpoint's .safetensors), read from the page cache")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tmp", default=None, help="folder for the output files (same file system as FILE)")
    args = ap.parse_args()
    with open(args.file, "rb") as fh:  # warm the page cache
        while fh.read(64 << 20):
            pass
    _hash()(b"")  # import the hash before any clock runs
    folder = tempfile.mkdtemp(prefix="delta-copy-", dir=args.tmp)
    best = {name: float("inf") for name in WAYS}
    try:
        names = list(WAYS)
        for r in range(max(1, args.repeat)):
            # interleaved, and each repeat in a rotated order: every way sees the same machine
            # and none is always the one that pays for the previous one's dirty pages
            for name in names[r % len(names):] + names[:r % len(names)]:
                way = WAYS[name]
                dst = os.path.join(folder, "out")
                os.sync()  # no dirty pages of the previous way left to throttle this one's writes
                c0 = time.process_time()
                way(args.file, dst)
                best[name] = min(best[name], time.process_time() - c0)
                os.unlink(dst)
    finally:
        os.rmdir(folder)
    gb = os.path.getsize(args.file) / 1e9
    print(f"{args.file}: {gb:.3f} GB, least CPU of {args.repeat} (load {os.getloadavg()[0]:.1f})")
    for name, cpu in best.items():
        print(f"  {name:24s} {cpu:.3f} s CPU")


if __name__ == "__main__":
    main()
