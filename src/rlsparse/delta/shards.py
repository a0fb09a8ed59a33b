"""A patch too large for one file: a folder of shards plus a versioned index.

Layout (``rlsparse delta pack --shard-size``), for a patch whose data exceeds the shard size::

    step30.rlpatch/
        patch.index.json                 # versioned JSON: patch id, every shard's name and data range
        patch-00001-of-00003.rlpatch     # safetensors: "manifest" + "data" (the first data range)
        patch-00002-of-00003.rlpatch     # safetensors: "data" (the next range)
        ...

The data of the one-file form is cut between chunk codes (a chunk never straddles two shards)
into consecutive ranges, one per shard; the manifest (same as in one file) goes in the first
shard. Every shard's ``__metadata__`` repeats the format, schema version, patch id (xxh3-128 of
the compressed manifest), its number and the shard count, so a shard of another patch, a missing
or truncated one, or a damaged index is refused before anything is decoded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlsparse.delta.format import (FORMAT, SCHEMA_VERSION, PatchReader, Segment, copy_spool, header_bytes,
                                   new_hasher, parse_header, read_manifest)
from rlsparse.errors import PatchError

INDEX = "patch.index.json"
INDEX_LAYOUT = "shards"
INDEX_SCHEMA_VERSION = 1


def shard_name(i: int, n: int) -> str:
    return f"patch-{i + 1:05d}-of-{n:05d}.rlpatch"


def patch_id(packed_manifest: bytes) -> str:
    h = new_hasher()
    h.update(packed_manifest)
    return h.hexdigest()


def write_folder(path: Path, packed: bytes, spool, total: int, cuts: list[int]) -> None:
    """Write the patch at ``path`` as a folder of shards (atomically: a temporary folder, renamed)."""
    from rlsparse.io.atomic import atomic_path

    bounds = [0, *cuts, total]
    n = len(bounds) - 1
    pid = patch_id(packed)
    index = {"format": FORMAT, "layout": INDEX_LAYOUT, "schema_version": INDEX_SCHEMA_VERSION,
             "patch_schema_version": SCHEMA_VERSION, "patch_id": pid, "data_bytes": total, "shards": []}
    with atomic_path(path, folder_output=True) as tmp:
        tmp.mkdir()
        for i in range(n):
            size = bounds[i + 1] - bounds[i]
            meta = {"format": FORMAT, "schema_version": str(SCHEMA_VERSION), "patch_id": pid,
                    "shard": str(i + 1), "shards": str(n), "data_offset": str(bounds[i])}
            tensors = ([("manifest", len(packed))] if i == 0 else []) + [("data", size)]
            name = shard_name(i, n)
            with open(tmp / name, "wb") as out:
                out.write(header_bytes(meta, tensors))
                if i == 0:
                    out.write(packed)
                copy_spool(spool, out, size)
                out.flush()
                os.fsync(out.fileno())
            index["shards"].append({"file": name, "data_offset": bounds[i], "data_bytes": size})
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        if path.is_file() or path.is_symlink():  # --overwrite of a one-file patch by a folder
            path.unlink()


def open_folder(folder: Path) -> PatchReader:
    """Open a sharded patch: check its index and every shard, read the manifest from the first."""
    where = str(folder)
    index = _read_index(folder)
    shards = index["shards"]
    pid = index["patch_id"]
    segments: list[Segment] = []
    manifest = None
    try:
        for i, entry in enumerate(shards):
            label = f"{folder}: shard {entry['file']} ({i + 1} of {len(shards)})"
            path = folder / entry["file"]
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise PatchError(f"{label} is missing; copy the complete patch folder") from None
            except OSError as exc:
                raise PatchError(f"{label} cannot be opened ({exc.strerror}); check its permissions") from None
            segments.append(Segment(entry["data_offset"], entry["data_bytes"], 0, fd=fd, label=label))
            meta, spans = parse_header(label, lambda k, at: os.pread(fd, k, at), os.fstat(fd).st_size)
            if meta.get("patch_id") != pid:
                raise PatchError(f"{label} belongs to another patch (id {str(meta.get('patch_id'))[:12]}..., this "
                                 f"patch is {pid[:12]}...); copy that shard again from the same pack")
            if meta.get("shard") != str(i + 1) or meta.get("shards") != str(len(shards)) \
                    or meta.get("data_offset") != str(entry["data_offset"]):
                raise PatchError(f"{label} says it is shard {meta.get('shard')} of {meta.get('shards')} at data offset "
                                 f"{meta.get('data_offset')}; the index disagrees: copy the patch folder again")
            start, size = spans["data"]
            if size != entry["data_bytes"]:
                raise PatchError(f"{label} holds {size} bytes of data, the index says {entry['data_bytes']}; "
                                 "copy the patch folder again")
            segments[-1].start = start
            if i == 0:
                if "manifest" not in spans:
                    raise PatchError(f"{label} has no manifest; the patch folder is corrupt: re-create it")
                m0, msize = spans["manifest"]
                packed = os.pread(fd, msize, m0)
                if patch_id(packed) != pid:
                    raise PatchError(f"{label}: its manifest does not match the patch id; copy the patch folder again")
                manifest = read_manifest(label, packed)
        return PatchReader(where, manifest, segments)
    except BaseException:
        for seg in segments:
            os.close(seg.fd)
        raise


def _read_index(folder: Path) -> dict:
    path = folder / INDEX
    if not path.is_file():
        raise PatchError(f"{folder}: is a folder without {INDEX}; expected a patch file or a sharded patch folder "
                         "written by `rlsparse delta pack`")
    try:
        index = json.loads(path.read_text())
        version = int(index.get("schema_version", 0))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
        raise PatchError(f"{path}: is not valid JSON; the patch folder is corrupt: re-create it") from None
    if index.get("format") != FORMAT or index.get("layout") != INDEX_LAYOUT:
        raise PatchError(f"{path}: not an rlsparse sharded-patch index (format {index.get('format')!r}, "
                         f"layout {index.get('layout')!r})")
    if version > INDEX_SCHEMA_VERSION:
        raise PatchError(f"{path}: index schema version {version} is newer than this rlsparse reads "
                         f"({INDEX_SCHEMA_VERSION}); upgrade rlsparse to apply it")
    try:
        shards = index["shards"]
        pos = 0
        for s in shards:
            if not isinstance(s["file"], str) or "/" in s["file"] or s["data_offset"] != pos or s["data_bytes"] < 0:
                raise ValueError(s)
            pos += s["data_bytes"]
        if not shards or pos != index["data_bytes"] or not isinstance(index["patch_id"], str):
            raise ValueError("ranges")
    except (KeyError, TypeError, ValueError):
        raise PatchError(f"{path}: the shard list is malformed; the patch folder is corrupt: re-create it") from None
    return index
