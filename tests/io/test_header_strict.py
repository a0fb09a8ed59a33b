"""The safetensors header parser is at least as strict as the safetensors library, and every
malformed input ends in the one-line CheckpointError (cases from the hardening issue, then a
property-based fuzz of valid headers' offsets, dtypes, shapes, lengths and JSON)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import safe_open

from rlsparse.errors import CheckpointError
from rlsparse.io.safetensors_format import read_header


def _write(path, header, data: bytes = b"", raw: bytes | None = None):
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _library_refuses(path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:
        return True
    return False


def _f32(begin, end, shape):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


CASES = {
    "overlap": ({"a": _f32(0, 8, [2]), "b": _f32(4, 12, [2])}, 12, "overlaps"),
    "gap": ({"a": _f32(0, 8, [2]), "b": _f32(12, 20, [2])}, 20, "gap"),
    "trailing bytes": ({"a": _f32(0, 8, [2])}, 16, "bytes after the last tensor"),
    "negative dim": ({"a": {"dtype": "F32", "shape": [-1, -8], "data_offsets": [0, 32]}}, 32, "shape"),
    "huge dim beside 0": ({"a": {"dtype": "F32", "shape": [2**70, 0], "data_offsets": [0, 0]}}, 0, "shape"),
    "product overflows": ({"a": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, 0,
                          "overflows"),
    "shape as string": ({"a": {"dtype": "F32", "shape": "[2]", "data_offsets": [0, 8]}}, 8, "shape"),
    "dtype as list": ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, 8, "dtype"),
    "metadata as list": ({"__metadata__": ["x"], "a": _f32(0, 8, [2])}, 8, "__metadata__"),
    "metadata not strings": ({"__metadata__": {"k": 1}, "a": _f32(0, 8, [2])}, 8, "__metadata__"),
    "entry not an object": ({"a": [1, 2]}, 0, "expected an object"),
    "offsets reversed": ({"a": _f32(8, 0, [2])}, 8, "data_offsets"),
    "bool dim": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "shape"),
    "top-level list": ([{"a": 1}], 0, "JSON list"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_headers_are_refused_like_the_library(tmp_path, case):
    header, nbytes, expect = CASES[case]
    path = _write(tmp_path / "x.safetensors", header, bytes(nbytes))
    with pytest.raises(CheckpointError, match=expect) as err:
        read_header(path)
    assert "\n" not in str(err.value)
    if case not in ("metadata not strings",):
        assert _library_refuses(path), f"{case}: the safetensors library reads it; the case is not malformed"


def test_duplicate_names_refused(tmp_path):
    raw = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    path = _write(tmp_path / "d.safetensors", None, bytes(8), raw=raw)
    with pytest.raises(CheckpointError, match="appears twice"):
        read_header(path)


def test_deep_nesting_is_one_line(tmp_path):
    raw = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = _write(tmp_path / "n.safetensors", None, raw=raw)
    with pytest.raises(CheckpointError, match="nests too deeply"):
        read_header(path)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_header(fifo)


def test_outside_file_bytes_are_not_printed(tmp_path):
    path = tmp_path / "passwd.safetensors"
    path.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert str(n) not in str(err.value)


# property-based fuzz -------------------------------------------------------------------------------
_DTYPES = {"F32": (torch.float32, 4), "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2),
           "U8": (torch.uint8, 1), "I64": (torch.int64, 8)}


@st.composite
def _valid_file(draw):
    n = draw(st.integers(1, 3))
    header, offset = {}, 0
    for i in range(n):
        code = draw(st.sampled_from(sorted(_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
        size = _DTYPES[code][1]
        for s in shape:
            size *= s
        header[f"t{i}"] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    data = draw(st.binary(min_size=offset, max_size=offset))
    return header, data


_MUTATIONS = st.one_of(
    st.tuples(st.just("offset"), st.integers(0, 2), st.integers(0, 1), st.integers(-9, 9)),
    st.tuples(st.just("dtype"), st.integers(0, 2), st.sampled_from(["F32", "BF16", "U8", "I64", "XX", "", 3, None])),
    st.tuples(st.just("shape"), st.integers(0, 2),
              st.sampled_from([[], [0], [1], [3, 1], [-1], [2**64], "2", [1.5], None, [[1]]])),
    st.tuples(st.just("length"), st.integers(-12, 12)),
    st.tuples(st.just("data"), st.integers(-9, 9)),
    st.tuples(st.just("byte"), st.integers(0, 400), st.integers(0, 255)),
    st.tuples(st.just("drop"), st.integers(0, 2)),
)


def _mutate(header, data, mutation) -> bytes:
    kind = mutation[0]
    names = [k for k in header if k != "__metadata__"]
    if kind in ("offset", "dtype", "shape", "drop") and names:
        name = names[mutation[1] % len(names)]
        if kind == "offset":
            header[name]["data_offsets"][mutation[2]] += mutation[3]
        elif kind == "dtype":
            header[name]["dtype"] = mutation[2]
        elif kind == "shape":
            header[name]["shape"] = mutation[2]
        else:
            del header[name]
    text = json.dumps(header).encode()
    length = len(text)
    if kind == "length":
        length = max(0, length + mutation[1])
    if kind == "data":
        data = data + bytes(mutation[1]) if mutation[1] >= 0 else data[: mutation[1]]
    blob = bytearray(struct.pack("<Q", length) + text + data)
    if kind == "byte" and blob:
        blob[mutation[1] % len(blob)] = mutation[2]
    return bytes(blob)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid=_valid_file(), mutations=st.lists(_MUTATIONS, min_size=0, max_size=2))
def test_fuzzed_headers_read_correctly_or_give_the_one_line_error(tmp_path, valid, mutations):
    header, data = valid
    header = json.loads(json.dumps(header))
    blob = None
    for m in mutations or [("none",)]:
        blob = _mutate(header, data, m) if m[0] != "none" else _mutate(header, data, ("offset", 0, 0, 0))
    path = tmp_path / "f.safetensors"
    path.write_bytes(blob)
    try:
        entries, _ = read_header(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        return
    # we read it: the safetensors library must read it too, with the same tensors and bytes
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(entries)
        for name, e in entries.items():
            t = f.get_tensor(name)
            assert t.dtype == _DTYPES[e.dtype][0] and tuple(t.shape) == e.shape
            assert t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == blob[e.offset:e.offset + e.nbytes]
