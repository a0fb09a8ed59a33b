"""The patch format is a contract: a checked-in patch still applies, and today's coder writes
the very same coded bytes and manifest entries for the same pair.

Regenerate (only on a deliberate format change, with a schema_version bump):
    python tests/delta/test_golden.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import rlsparse.delta as delta
from rlsparse.delta.format import PatchReader

from deltahelpers import assert_bit_identical, bits_tensor, config_files, load, write

GOLDEN = Path(__file__).parent.parent / "data" / "golden.rlpatch"


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


def test_golden_patch_applies_bit_exactly(tmp_path):
    base, ft = _write_pair(tmp_path)
    delta.apply(base, GOLDEN, tmp_path / "out")
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


if __name__ == "__main__":  # regenerate
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        b, f = _write_pair(Path(tmp))
        delta.pack(b, f, GOLDEN, chunk_elements=1024)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)", file=sys.stderr)
