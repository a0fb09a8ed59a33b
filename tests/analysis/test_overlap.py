"""Overlap of subnetworks (section 5, Appendix E) against brute-force set counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _build import base_model, brute_changed, bump, random_choice, state, write
from rlsparse.analysis.overlap import overlap, overlap_from_checkpoints
from rlsparse.errors import MaskError, MismatchError, UsageError
from rlsparse.masks import Mask


def _brute(a: dict, b: dict) -> tuple[int, int, int, int]:
    n = sum(v.numel() for v in a.values())
    ca = sum(int(v.sum()) for v in a.values())
    cb = sum(int(v.sum()) for v in b.values())
    both = sum(int((a[k] & b[k]).sum()) for k in a)
    return n, ca, cb, both


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 23)), min_size=1, max_size=4),
       densities=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)), seed=st.integers(0, 2**16),
       chunk=st.integers(8, 64))
def test_packed_counting_equals_brute_force(shapes, densities, seed, chunk):
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(len(shapes))]
    masks = [{n: torch.rand(s, generator=g) < d for n, s in zip(names, shapes)} for d in densities]
    r = overlap([Mask.from_tensors(m) for m in masks], labels=["a", "b", "c"], chunk_elements=chunk)
    for p, (i, j) in zip(r.pairs, [(0, 1), (0, 2), (1, 2)]):
        n, ca, cb, both = _brute(masks[i], masks[j])
        t = p.total
        assert (t.numel, t.changed_a, t.changed_b, t.both) == (n, ca, cb, both)
        assert t.o1 == (both / ca if ca else None)
        assert t.o2 == (both / cb if cb else None)
        assert t.jaccard == (both / (ca + cb - both) if ca + cb - both else None)
        assert t.o1_random == cb / n and t.o2_random == ca / n
        assert r.matrix()[i, j] == pytest.approx(both / ca) if ca else np.isnan(r.matrix()[i, j])


def test_known_overlap_from_mask_files_with_breakdowns(tmp_path):
    q, up = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
    a = {q: torch.zeros(4, 10, dtype=torch.bool), up: torch.zeros(3, 7, dtype=torch.bool)}
    b = {k: v.clone() for k, v in a.items()}
    a[q].view(-1)[:20] = True  # 20 in A
    b[q].view(-1)[10:30] = True  # 20 in B, 10 shared
    a[up].view(-1)[:3] = True  # 3 in A, none in B
    Mask.from_tensors(a, tolerance=1e-5).save(tmp_path / "a.mask")
    Mask.from_tensors(b, tolerance=1e-5).save(tmp_path / "b.mask")
    r = overlap([tmp_path / "a.mask", tmp_path / "b.mask"], chunk_elements=8)
    t = r.pairs[0].total
    assert (t.numel, t.changed_a, t.changed_b, t.both) == (61, 23, 20, 10)
    assert t.o1 == 10 / 23 and t.o2 == 10 / 20 and t.jaccard == 10 / 33
    assert t.o1_random == 20 / 61 and t.o2_random == 23 / 61
    assert t.o1_ratio == pytest.approx((10 / 23) / (20 / 61))
    p = r.pairs[0]
    assert set(p.by_layer) == {"0", "1"} and set(p.by_type) == {"q", "up"}
    assert p.by_type["q"].o1 == 0.5 and p.by_type["up"].o2 is None and p.by_type["up"].o1 == 0.0
    doc = r.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["schema_version"] == 1 and doc["tolerance"] == 1e-5
    e = doc["pairs"][0]
    assert e["a"].endswith("a.mask") and e["b"].endswith("b.mask")
    for key in ("o1", "o2", "jaccard", "o1_random", "o2_random"):
        assert 0 <= e[key] <= 1
    assert doc["matrix"]["overlap"][0][1] == 10 / 23 and doc["matrix"]["overlap"][1][0] == 10 / 20


def test_refuses_masks_of_different_models(tmp_path):
    a = {"w": torch.ones(4, 8, dtype=torch.bool)}
    with pytest.raises(MismatchError, match="shapes differ"):
        overlap([Mask.from_tensors(a), Mask.from_tensors({"w": torch.ones(8, 4, dtype=torch.bool)})])
    with pytest.raises(MismatchError, match="only in"):
        overlap([Mask.from_tensors(a), Mask.from_tensors({"v": torch.ones(4, 8, dtype=torch.bool)})])
    with pytest.raises(UsageError, match="at least two"):
        overlap([Mask.from_tensors(a)])
    (tmp_path / "junk.mask").write_bytes(b"not a mask")
    with pytest.raises(MaskError):
        overlap([tmp_path / "junk.mask", Mask.from_tensors(a)])


def test_from_checkpoints_equals_brute_force(tmp_path):
    base, sd = base_model(tmp_path)
    ft_a = write(bump(sd, random_choice(sd, 0.3, seed=1)), base, tmp_path / "a", shard="50KB")
    ft_b = write(bump(sd, random_choice(sd, 0.5, seed=2)), base, tmp_path / "b")
    r = overlap_from_checkpoints(base, ft_a, base, ft_b, tolerance=1e-5, chunk_elements=200)
    sa, sb = state(ft_a), state(ft_b)
    ma = {k: brute_changed(sd[k], sa[k], 1e-5) for k in sd}
    mb = {k: brute_changed(sd[k], sb[k], 1e-5) for k in sd}
    t = r.pairs[0].total
    assert (t.numel, t.changed_a, t.changed_b, t.both) == _brute(ma, mb)
    assert r.source == "checkpoints" and r.tolerance == 1e-5
    # the same numbers through saved masks
    ra = overlap([Mask.from_tensors(ma), Mask.from_tensors(mb)])
    assert ra.pairs[0].total == t


def test_from_checkpoints_refuses_other_base_model(tmp_path):
    from _build import save, tiny_llama

    base, _ = base_model(tmp_path)
    other = save(tiny_llama(vocab=128), tmp_path / "other")
    with pytest.raises(MismatchError, match="same base model|shape"):
        overlap_from_checkpoints(base, base, other, other)
