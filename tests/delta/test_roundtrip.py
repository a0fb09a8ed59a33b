"""pack -> apply is bit-exact: random pairs in every dtype, FP8 with scales, NaN payloads, +-0,
empty and scalar tensors, resized, added and removed tensors, tied embeddings, sharded output."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlsparse.delta as delta
from rlsparse.io.checkpoint import Checkpoint

from deltahelpers import KINDS, assert_bit_identical, bits_of, bits_tensor, change, config_files, load, random_bits, write

SHAPES = [(), (0,), (0, 3), (1,), (7,), (5, 9), (33, 17), (4, 3, 5)]


@st.composite
def pairs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base, ft = {}, {}
    for i in range(draw(st.integers(1, 6))):
        code = draw(st.sampled_from(sorted(KINDS)))
        shape = draw(st.sampled_from(SHAPES))
        n = int(np.prod(shape)) if shape else 1
        a = random_bits(rng, code, n, small=draw(st.booleans()))
        b = change(rng, a, draw(st.sampled_from([0.0, 0.01, 0.2, 0.9])), ulps=draw(st.booleans()))
        base[f"t{i}"] = bits_tensor(a, code, shape)
        ft[f"t{i}"] = bits_tensor(b, code, shape)
    if draw(st.booleans()):  # FP8 weights with their block scales, both changed
        w = random_bits(rng, "F8_E4M3", 130 * 4, small=False)
        s = np.array([1.0, 0.5], dtype=np.float32).view(np.int32)
        base["w.weight"], base["w.weight_scale_inv"] = bits_tensor(w, "F8_E4M3", (130, 4)), bits_tensor(s, "F32", (2, 1))
        ft["w.weight"] = bits_tensor(change(rng, w, 0.3, ulps=True), "F8_E4M3", (130, 4))
        ft["w.weight_scale_inv"] = bits_tensor(change(rng, s, 1.0, ulps=True), "F32", (2, 1))
    if draw(st.booleans()):  # resized vocabulary: rows added, old rows slightly changed
        e = random_bits(rng, "BF16", 10 * 4, small=True)
        base["embed.weight"] = bits_tensor(e, "BF16", (10, 4))
        grown = np.concatenate([change(rng, e, 0.1, ulps=True), random_bits(rng, "BF16", 8, small=True)])
        ft["embed.weight"] = bits_tensor(grown, "BF16", (12, 4))
    if draw(st.booleans()):
        base["only.base"] = bits_tensor(random_bits(rng, "F32", 6, small=True), "F32", (6,))
    if draw(st.booleans()):
        ft["only.ft"] = bits_tensor(random_bits(rng, "F16", 6, small=True), "F16", (2, 3))
    if draw(st.booleans()):  # dtype changed: stored whole
        base["cast"] = bits_tensor(random_bits(rng, "F32", 8, small=True), "F32", (8,))
        ft["cast"] = bits_tensor(random_bits(rng, "BF16", 8, small=True), "BF16", (8,))
    return base, ft, draw(st.sampled_from([8, 64, 4096]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs())
def test_pack_apply_round_trip_is_bit_exact(pair):
    base_t, ft_t, chunk = pair
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = write(tmp / "base", base_t)
        ft = write(tmp / "ft", ft_t, config_files())
        res = delta.pack(base, ft, tmp / "p.rlpatch", chunk_elements=chunk)
        expected_changed = sum(int((bits_of(ft_t[k]).reshape(-1) != bits_of(base_t[k]).reshape(-1)).sum())
                               for k in ft_t if k in base_t and base_t[k].dtype == ft_t[k].dtype
                               and base_t[k].shape == ft_t[k].shape and ft_t[k].numel())
        assert res.changed == expected_changed
        delta.apply(base, tmp / "p.rlpatch", tmp / "out")
        assert_bit_identical(load(tmp / "out"), ft_t)
        for name, data in config_files().items():
            assert (tmp / "out" / name).read_bytes() == data
        sd = {k: v.clone() for k, v in base_t.items()}
        delta.apply_to_state_dict(sd, tmp / "p.rlpatch")
        assert_bit_identical(sd, ft_t)
        # the in-memory pack codes exactly the same patch content
        mem = delta.pack(base_t, ft_t, None, chunk_elements=chunk, files=False)
        sd = {k: v.clone() for k, v in base_t.items()}
        delta.apply_to_state_dict(sd, mem.data)
        assert_bit_identical(sd, ft_t)


def test_sharded_output_with_index_and_tied_embeddings(tmp_path):
    from tinymodels import save, tiny_llama

    model = tiny_llama(tie=True)
    base = save(model, tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.view(-1)[::11] += 0.01
    ft = save(model, tmp_path / "ft", shard="30KB")
    assert "lm_head.weight" not in Checkpoint.open(ft).tensors  # tied: stored once
    delta.pack(base, ft, tmp_path / "p.rlpatch")
    res = delta.apply(base, tmp_path / "p.rlpatch", tmp_path / "out", max_shard_bytes=20_000)
    assert res.shards > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert Checkpoint.open(tmp_path / "out").layout == "safetensors-index"
    assert_bit_identical(load(tmp_path / "out"), load(ft))
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.embed_tokens.weight.view(torch.int16),
                       model.model.embed_tokens.weight.view(torch.int16))


def test_apply_to_module_updates_parameters_in_place(tmp_path):
    from tinymodels import save, tiny_llama

    model = tiny_llama()
    save(model, tmp_path / "base")
    target = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.view(-1)[::5] += 0.02
    save(model, tmp_path / "ft")
    delta.pack(tmp_path / "base", tmp_path / "ft", tmp_path / "p.rlpatch")
    delta.apply_to_module(target, tmp_path / "p.rlpatch")
    for (n, a), (_, b) in zip(model.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), n


def test_inspect_reports_what_was_packed(tmp_path, tiny_pair):
    base, ft = tiny_pair
    res = delta.pack(base, ft, tmp_path / "p.rlpatch")
    doc = delta.inspect(tmp_path / "p.rlpatch")
    assert doc["schema_version"] == 1
    assert doc["total"]["changed"] == res.changed
    assert doc["total"]["coded_bytes"] == sum(t["bytes"] for t in doc["tensors"])
    a, b = load(base), load(ft)
    for t in doc["tensors"]:
        brute = int((a[t["name"]].view(torch.int16) != b[t["name"]].view(torch.int16)).sum())
        assert t["changed"] == brute, t["name"]
    assert {f["name"] for f in doc["files"]} >= {"config.json"}
