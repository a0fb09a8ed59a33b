"""The patch format is a contract: checked-in patches of every schema version still apply, and
today's coder writes the very same coded bytes and manifest entries for the same pair as the
golden patch of the current version (and, chunk by chunk, as the version-1 golden patch when
asked for version 1's coder).

Write the golden patch of the current version (only on a deliberate format change, with a
schema_version bump; never overwrite an older version's file):
    python tests/delta/test_golden.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rlsparse.delta as delta
from rlsparse.delta import codec
from rlsparse.delta.apply import spans_of
from rlsparse.delta.format import SCHEMA_VERSION, PatchReader
from rlsparse.io import dtypes

from deltahelpers import assert_bit_identical, bits_of, bits_tensor, config_files, load, write

DATA = Path(__file__).parent.parent / "data"
GOLDEN_V1 = DATA / "golden.rlpatch"  # schema version 1 (ANS symbol coder)
GOLDEN = DATA / f"golden-v{SCHEMA_VERSION}.rlpatch"


def golden_pair() -> tuple[dict, dict]:
    """A small pair from arithmetic only (stable across numpy versions): sparse bf16 ULP steps,
    a dense fp32 change, FP8 with a changed scale, NaN payload and -0.0, a scalar, an empty
    tensor, a resized embedding, one tensor added and one removed."""
    i = np.arange(4096)
    w = ((i * 2654435761) % 65521 - 32760).astype(np.float32) * 1e-6
    wb = bits_tensor(np.frombuffer(w.astype(np.float32).tobytes(), np.uint32) >> 16, "BF16", (64, 64))
    wb2 = wb.clone()
    sel = i[(i * 7919) % 97 == 0]
    ints = wb2.view(-1).view(torch.int16)
    ints[torch.from_numpy(sel)] += torch.from_numpy(((sel % 3) + 1).astype(np.int16))  # +1..3 ULPs
    ints[5] = 0x7FC5  # NaN with a payload
    ints[6] = -32768  # -0.0
    f = (np.arange(100, dtype=np.float32) - 50) / 7
    base = {
        "layer.weight": wb,
        "dense.weight": bits_tensor(f.view(np.int32), "F32", (10, 10)),
        "fp8.weight": bits_tensor((np.arange(256) % 251).astype(np.uint8), "F8_E4M3", (16, 16)),
        "fp8.weight_scale_inv": bits_tensor(np.array([1.0], np.float32).view(np.int32), "F32", (1, 1)),
        "scalar": bits_tensor(np.array([2.5], np.float32).view(np.int32), "F32", ()),
        "empty": bits_tensor(np.zeros(0, np.int16), "BF16", (0, 4)),
        "embed.weight": bits_tensor((np.arange(24) * 37 % 200).astype(np.int16), "BF16", (6, 4)),
        "removed.bias": bits_tensor(np.arange(4, dtype=np.int16), "BF16", (4,)),
    }
    ft = dict(base)
    ft["layer.weight"] = wb2
    ft["dense.weight"] = bits_tensor((f * 1.001).view(np.int32), "F32", (10, 10))
    ft["fp8.weight"] = bits_tensor(((np.arange(256) % 251) + (np.arange(256) % 5 == 0)).astype(np.uint8), "F8_E4M3", (16, 16))
    ft["fp8.weight_scale_inv"] = bits_tensor(np.array([0.75], np.float32).view(np.int32), "F32", (1, 1))
    ft["embed.weight"] = bits_tensor((np.arange(32) * 37 % 200).astype(np.int16), "BF16", (8, 4))
    del ft["removed.bias"]
    ft["added.bias"] = bits_tensor(np.arange(3, dtype=np.int16) + 100, "BF16", (3,))
    return base, ft


def _write_pair(root: Path) -> tuple[Path, Path]:
    base, ft = golden_pair()
    return write(root / "base", base), write(root / "ft", ft, config_files())


@pytest.mark.parametrize("golden", [GOLDEN_V1, GOLDEN], ids=["v1", "current"])
def test_golden_patch_applies_bit_exactly(tmp_path, golden):
    base, ft = _write_pair(tmp_path)
    with PatchReader.open(golden) as g:
        assert g.manifest.schema_version == (1 if golden == GOLDEN_V1 else SCHEMA_VERSION)
    delta.apply(base, golden, tmp_path / "out")
    assert_bit_identical(load(tmp_path / "out"), load(ft))
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == config_files()["tokenizer.json"]


def test_todays_coder_writes_the_golden_bytes(tmp_path):
    base, ft = _write_pair(tmp_path)
    delta.pack(base, ft, tmp_path / "p.rlpatch", chunk_elements=1024)
    with PatchReader.open(GOLDEN) as g, PatchReader.open(tmp_path / "p.rlpatch") as p:
        assert [vars(e) for e in p.manifest.tensors] == [vars(e) for e in g.manifest.tensors]
        assert [vars(f) for f in p.manifest.files] == [vars(f) for f in g.manifest.files]
        assert p.read(0, p.size) == g.read(0, g.size)
        actions = {e.name: e.action for e in g.manifest.tensors}
    assert actions["layer.weight"] == "delta" and actions["embed.weight"] == "whole"
    assert actions["removed.bias"] == "remove" and actions["added.bias"] == "whole"


def test_version_1_coder_still_writes_the_v1_golden_chunks():
    """Every chunk of the v1 golden patch, re-coded with version 1's symbol coder, byte for byte."""
    base, ft = golden_pair()
    checked = 0
    with PatchReader.open(GOLDEN_V1) as g:
        for e in g.manifest.tensors:
            if e.action == "remove":
                continue
            new = bits_of(ft[e.name]).reshape(-1).numpy().view(dtypes.uint_view(e.dtype))
            old = bits_of(base[e.name]).reshape(-1).numpy().view(dtypes.uint_view(e.dtype)) \
                if e.action == "delta" else None
            at = e.offset
            for (s, c), (enc, size) in zip(spans_of(e), e.chunks):
                got = codec.encode_chunk(None if old is None else old[s:s + c], new[s:s + c],
                                         e.dtype in dtypes.FLOAT_CODES, version=1)
                assert (got[0], got[2]) == (enc, g.read(at, size)), (e.name, s)
                at += size
                checked += 1
    assert checked >= 8


if __name__ == "__main__":  # regenerate
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        b, f = _write_pair(Path(tmp))
        delta.pack(b, f, GOLDEN, chunk_elements=1024)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)", file=sys.stderr)
