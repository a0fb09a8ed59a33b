"""``rlsparse delta inspect``: what a patch holds, per tensor and in total."""

from __future__ import annotations

from collections import Counter

from rlsparse.delta.codec import ENCODING_NAMES
from rlsparse.delta.format import SCHEMA_VERSION, PatchReader
from rlsparse.io import dtypes

INSPECT_SCHEMA_VERSION = 1


def inspect(patch) -> dict:
    """Summary of a patch as a JSON-ready dict (versioned: ``schema_version``).

    Per tensor: action, dtype, shape, elements, changed, density, coded bytes, bits per changed
    element, encodings used by its chunks; totals; non-weight files.

    Example:
        >>> doc = rlsparse.delta.inspect("step30.rlpatch")
        >>> doc["total"]["density"]
    """
    reader = patch if isinstance(patch, PatchReader) else PatchReader.open(patch)
    try:
        m = reader.manifest
        tensors = []
        for e in m.tensors:
            encodings = Counter(ENCODING_NAMES.get(c[0], str(c[0])) for c in e.chunks)
            tensors.append({
                "name": e.name, "action": e.action, "dtype": e.dtype or e.base_dtype,
                "shape": e.shape if e.shape is not None else e.base_shape,
                "numel": e.numel if e.action != "remove" else 0, "changed": e.changed,
                "density": e.changed / e.numel if e.action == "delta" and e.numel else None,
                "bytes": e.nbytes,
                "bits_per_changed": 8 * e.nbytes / e.changed if e.changed else None,
                "encodings": dict(encodings)})
        numel = sum(t["numel"] for t in tensors)
        changed = sum(t["changed"] for t in tensors if t["action"] == "delta")
        delta_numel = sum(t["numel"] for t in tensors if t["action"] == "delta")
        full = sum(e.numel * dtypes.itemsize(e.dtype) for e in m.tensors if e.action != "remove")
        coded = sum(t["bytes"] for t in tensors)
        return {
            "schema_version": INSPECT_SCHEMA_VERSION,
            "patch": {"path": reader.where, "schema_version": m.schema_version, "format_version": SCHEMA_VERSION,
                      "tool": m.tool, "hash": m.hash, "base": m.base, "finetuned": m.finetuned},
            "total": {"tensors": len(tensors), "numel": numel, "changed": changed,
                      "density": changed / delta_numel if delta_numel else None,
                      "coded_bytes": coded, "file_bytes": sum(f.stored for f in m.files),
                      "finetuned_bytes": full, "ratio": full / coded if coded else None,
                      "actions": dict(Counter(t["action"] for t in tensors))},
            "files": [{"name": f.name, "size": f.size, "stored": f.stored} for f in m.files],
            "tensors": tensors,
        }
    finally:
        if reader is not patch:
            reader.close()
