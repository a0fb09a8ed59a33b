"""The mask format is a contract: golden file, bit order, round trips, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlsparse.errors import MaskError, MismatchError, OutputError
from rlsparse.masks import Mask, MaskMeta, pack

GOLDEN = Path(__file__).parent.parent / "data" / "golden.mask.safetensors"


def _golden_mask() -> Mask:
    w = torch.zeros(3, 5, dtype=torch.bool)
    w[0, 0] = w[0, 2] = w[0, 3] = w[1, 3] = w[2, 4] = True
    b = torch.tensor([True, False, False, False, False, False, False, False, True])
    return Mask.from_tensors({"layers.0.w": w, "layers.0.b": b}, tolerance=1e-05, base="base", finetuned="ft",
                             tool_version="golden")


def test_golden_file_reads_and_rewrites_bit_exactly(tmp_path):
    m = Mask.load(GOLDEN)
    ref = _golden_mask()
    assert m.names == ["layers.0.w", "layers.0.b"]
    for name in ref.names:
        assert torch.equal(m.get(name), ref.get(name))
    assert m.count("layers.0.w") == 5 and m.ones == 7 and m.numel == 24
    assert m.meta.tolerance == 1e-05 and m.meta.base == "base" and m.meta.schema_version == 1
    # the documented bit order: element i is bit i % 8 of byte i // 8
    assert list(m.packed("layers.0.b")) == [0b00000001, 0b00000001]
    assert list(m.packed("layers.0.w")) == [0b00001101, 0b01000001]
    ref.save(tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == GOLDEN.read_bytes()
    with safe_open(str(GOLDEN), framework="pt") as f:  # readable by the safetensors library itself
        assert f.metadata()["format"] == "rlsparse.mask"


def test_round_trip_random_shapes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.rand(*shape, generator=g) < 0.3 for i, shape in
               enumerate([(1,), (7,), (8,), (9, 3), (4, 4, 5), (0,), (31, 33)])}
    Mask.from_tensors(tensors).save(tmp_path / "m.safetensors")
    m = Mask.load(tmp_path / "m.safetensors")
    for k, v in tensors.items():
        assert torch.equal(m.get(k), v)
        assert m.count(k) == int(v.sum())
    assert np.isclose(m.density, sum(int(v.sum()) for v in tensors.values()) / sum(v.numel() for v in tensors.values()))


def test_refuses_files_that_are_not_masks(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MaskError, match="without rlsparse mask metadata"):
        Mask.load(tmp_path / "model.safetensors")
    (tmp_path / "junk").write_bytes(b"hello")
    with pytest.raises(MaskError):
        Mask.load(tmp_path / "junk")
    with pytest.raises(MaskError, match="no such mask file"):
        Mask.load(tmp_path / "absent")


def test_newer_schema_is_refused(tmp_path):
    save_file({"w": torch.from_numpy(pack(torch.ones(3, dtype=torch.bool)))},
              str(tmp_path / "m.safetensors"),
              metadata={"format": "rlsparse.mask", "schema_version": "99",
                        "rlsparse": MaskMeta(shapes={"w": [3]}, counts={"w": 3}).to_json()})
    with pytest.raises(MaskError, match="schema_version 99"):
        Mask.load(tmp_path / "m.safetensors")


def test_compatibility_check_names_the_difference():
    a = Mask.from_tensors({"x": torch.ones(2, 2), "y": torch.ones(3)})
    b = Mask.from_tensors({"x": torch.ones(2, 3), "z": torch.ones(3)})
    with pytest.raises(MismatchError) as e:
        a.check_compatible(b)
    assert "only in" in str(e.value) and "shapes differ" in str(e.value)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(OutputError):
        Mask.from_tensors({"x": torch.ones(2)}).save(tmp_path / "no" / "such" / "dir.safetensors")

    class Boom(Exception):
        pass

    from rlsparse.masks import MaskWriter

    with pytest.raises(Boom):
        with MaskWriter(tmp_path / "m.safetensors", {"x": (16,)}) as w:
            w.write("x", np.zeros(1, np.uint8))
            raise Boom
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("metadata", [
    {"schema_version": "abc"}, {"schema_version": "-1"}, {"rlsparse": "null"}, {"rlsparse": "[1]"},
    {"rlsparse": '{"shapes": {"w": "4"}, "counts": {"w": 1}}'},
    {"rlsparse": '{"shapes": {"w": [4]}, "counts": {"w": "1"}}'},
    {"rlsparse": '{"shapes": {"w": [4]}, "counts": {}}'},
    {"rlsparse": '{"shapes": {"w": [4]}, "counts": {"w": 1}, "tolerance": "x"}'},
    {"rlsparse": "[" * 100_000 + "]" * 100_000},
])
def test_malformed_mask_metadata_is_one_line(tmp_path, metadata):
    good = {"format": "rlsparse.mask", "schema_version": "1",
            "rlsparse": '{"shapes": {"w": [4]}, "counts": {"w": 1}}'}
    save_file({"w": torch.tensor([1], dtype=torch.uint8)}, str(tmp_path / "m"), metadata={**good, **metadata})
    with pytest.raises(MaskError) as err:
        Mask.load(tmp_path / "m")
    assert "\n" not in str(err.value)
