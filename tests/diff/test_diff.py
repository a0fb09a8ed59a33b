"""End-to-end diffs of tiny checkpoints with exactly known changes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import rlsparse
from tinymodels import brute_changed, save, state, tiny_llama
from rlsparse.errors import CheckpointError, MismatchError
from rlsparse.masks import Mask

TOLS = (0.0, 1e-8, 1e-7, 1e-6, 1e-5)


def _expected(base_sd, ft_sd, names=None):
    exp = {}
    for name in names or base_sd:
        exp[name] = [int(brute_changed(base_sd[name], ft_sd[name], t).sum()) for t in TOLS]
    return exp


def test_counts_equal_brute_force_across_shard_layouts(tiny_pair, tmp_path):
    base, ft = tiny_pair
    r = rlsparse.diff(base, ft, mask_path=tmp_path / "m.safetensors", chunk_elements=512)
    a, b = state(base), state(ft)
    exp = _expected(a, b)
    assert set(r.tensors) == set(a)
    for name, counts in exp.items():
        assert [r.tensors[name].changed[lab] for lab in r.labels] == counts, name
        assert r.tensors[name].bit_changed == int((a[name].view(torch.int16) != b[name].view(torch.int16)).sum())
    assert r.labels == ["0", "1e-08", "1e-07", "1e-06", "1e-05"]
    total = sum(c[-1] for c in exp.values())
    assert r.total.changed["1e-05"] == total
    assert r.total.numel == sum(t.numel() for t in a.values())
    # the saved mask is exactly the brute-force 'changed at 1e-5'
    mask = Mask.load(tmp_path / "m.safetensors")
    assert mask.meta.tolerance == 1e-5 and mask.ones == total
    for name in a:
        assert torch.equal(mask.get(name), brute_changed(a[name], b[name], 1e-5)), name


def test_known_special_values_and_subtolerance_changes(tmp_path):
    model = tiny_llama()
    base = save(model, tmp_path / "a")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    w = sd["model.layers.0.self_attn.q_proj.weight"].view(-1)
    w[0] = 0.0
    sd_base = {k: v.clone() for k, v in sd.items()}
    sd_base["model.layers.0.self_attn.q_proj.weight"].view(-1)[0] = -0.0
    sd_base["model.layers.0.self_attn.q_proj.weight"].view(-1)[1] = float("nan")
    w[1] = float("nan")  # NaN at the same place: unchanged
    w[2] = float("nan")  # NaN on one side: changed at every tolerance
    # a change of 1 bf16 ulp near 1e-4 (~5e-7): changed at 0..1e-7, not at 1e-6 / 1e-5
    w[3] = 1e-4
    sd_base["model.layers.0.self_attn.q_proj.weight"].view(-1)[3] = 1e-4
    w[3] = torch.tensor(1e-4, dtype=torch.bfloat16).view(torch.int16).add(1).view(torch.bfloat16)
    save_file(sd_base, str(tmp_path / "base.safetensors"))
    save_file(sd, str(tmp_path / "ft.safetensors"))
    r = rlsparse.diff(tmp_path / "base.safetensors", tmp_path / "ft.safetensors")
    q = r.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert [q.changed[lab] for lab in r.labels] == [2, 2, 2, 1, 1]
    assert q.bit_changed == 3  # -0.0 vs +0.0 differs in bits, not in value
    assert q.nan_base == 1 and q.nan_finetuned == 2
    assert r.total.changed["1e-05"] == 1
    del base


def test_prefixes_tied_embeddings_and_pytorch_bin(tmp_path):
    base_model = tiny_llama(tie=True)
    ft_model = tiny_llama(tie=True)
    with torch.no_grad():
        ft_model.load_state_dict(base_model.state_dict())
        ft_model.model.embed_tokens.weight[0, :4] += 1.0
    base = save(base_model, tmp_path / "base")
    sd = {f"module._orig_mod.{k}": v.clone() for k, v in ft_model.state_dict().items()}
    sd["module._orig_mod.lm_head.weight"] = ft_model.model.embed_tokens.weight.detach().clone()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    r = rlsparse.diff(base, tmp_path / "pytorch_model.bin")
    assert any("module._orig_mod." in n for n in r.notes)
    assert any("tied" in n for n in r.notes)
    assert r.tensors["model.embed_tokens.weight"].changed["0"] == 4
    assert r.tensors["lm_head.weight"].changed["0"] == 4  # compared against base's embedding


def test_missing_resize_and_dtype_mismatch(tmp_path):
    m = tiny_llama()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    save_file(sd, str(tmp_path / "a.safetensors"))
    sd2 = dict(sd)
    sd2.pop("model.norm.weight")
    emb = sd["model.embed_tokens.weight"]
    sd2["model.embed_tokens.weight"] = torch.cat([emb, torch.ones(3, emb.shape[1], dtype=emb.dtype)])
    sd2["lm_head.weight"] = sd["lm_head.weight"].float()
    sd2["lm_head.weight"][0, 0] += 1.0
    save_file(sd2, str(tmp_path / "b.safetensors"))
    with pytest.raises(MismatchError) as e:
        rlsparse.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    msg = str(e.value)
    assert "model.norm.weight" in msg and "allow_missing=True" in msg and "allow_resize=True" in msg and "\n" not in msg
    r = rlsparse.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", allow_missing=True,
                      allow_resize=True, mask_path=tmp_path / "m.safetensors")
    assert r.only_in_base == ["model.norm.weight"]
    assert r.tensors["model.embed_tokens.weight"].numel == emb.numel()
    assert r.tensors["model.embed_tokens.weight"].changed["0"] == 0
    assert r.tensors["lm_head.weight"].changed["0"] == 1 and r.tensors["lm_head.weight"].bit_changed is None
    assert any("dtypes differ" in n for n in r.notes)
    mask = Mask.load(tmp_path / "m.safetensors")
    e = mask.get("model.embed_tokens.weight")
    assert e.shape == (emb.shape[0] + 3, emb.shape[1]) and not e[:-3].any() and e[-3:].all()
    # casting both to bf16 first: the fp32 copy of a bf16 tensor has no other change
    r2 = rlsparse.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", allow_missing=True,
                       allow_resize=True, compare_dtype="bf16")
    assert r2.tensors["lm_head.weight"].changed["0"] == 1


def test_fp8_block_scales_dequantised_and_planned_across_shards(tmp_path):
    torch.manual_seed(0)
    w = (torch.randn(200, 300) * 3).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3) + 0.5
    w2 = w.clone()
    w2.view(torch.uint8)[5, 7] ^= 1  # one element's bits
    s2 = s.clone()
    s2[1, 2] *= 2  # a whole block (rows 128-199, cols 256-299) changes value, bits equal
    save_file({"model.layers.0.mlp.up_proj.weight": w}, str(tmp_path / "a1.safetensors"))
    save_file({"model.layers.0.mlp.up_proj.weight_scale_inv": s}, str(tmp_path / "a2.safetensors"))
    idx = {"weight_map": {"model.layers.0.mlp.up_proj.weight": "a1.safetensors",
                          "model.layers.0.mlp.up_proj.weight_scale_inv": "a2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    (tmp_path / "ft").mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": w2, "model.layers.0.mlp.up_proj.weight_scale_inv": s2},
              str(tmp_path / "ft" / "model.safetensors"))
    r = rlsparse.diff(tmp_path, tmp_path / "ft", chunk_elements=300 * 128)
    t = r.tensors["model.layers.0.mlp.up_proj.weight"]
    deq = lambda w, s: w.float() * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    exp = brute_changed(deq(w, s), deq(w2, s2), 0).sum()
    assert t.changed["0"] == int(exp) and t.bit_changed == 1
    assert set(r.tensors) == {"model.layers.0.mlp.up_proj.weight"}  # scales are not parameters
    assert any("FP8" in n for n in r.notes)


def test_aggregates_are_weighted_by_elements(tiny_pair):
    base, ft = tiny_pair
    r = rlsparse.diff(base, ft)
    for lab in r.labels:
        by_type = r.by_type()
        assert sum(a.changed[lab] for a in by_type.values()) == r.total.changed[lab]
        assert sum(a.numel for a in r.by_layer().values()) == r.total.numel
    q = r.by_type()["q"]
    qs = [t for t in r.tensors.values() if t.type == "q"]
    assert q.sparsity("0") == 1 - sum(t.changed["0"] for t in qs) / sum(t.numel for t in qs)
    assert set(r.grid()) == {(layer, typ) for layer in (0, 1) for typ in
                             ("q", "k", "v", "o", "gate", "up", "down", "norm")}


def test_json_document_and_histogram_bounds(tiny_pair):
    base, ft = tiny_pair
    r = rlsparse.diff(base, ft)
    doc = json.loads(json.dumps(r.to_json()))
    assert doc["schema_version"] == 1
    assert doc["total"]["changed"]["1e-05"] == r.total.changed["1e-05"]
    name = "model.layers.1.mlp.down_proj.weight"
    assert doc["tensors"][name]["numel"] == 32 * 64
    assert set(doc["tensors"][name]["changed"]) == {"0", "1e-08", "1e-07", "1e-06", "1e-05"}
    lo, hi = r.changed_bounds(1e-3)
    a, b = state(base), state(ft)
    exact = sum(int(brute_changed(a[n], b[n], 1e-3).sum()) for n in a)
    assert lo <= exact <= hi
    assert r.changed_bounds(1e-5) == (r.total.changed["1e-05"],) * 2


def test_truncated_and_corrupt_files(tmp_path):
    m = tiny_llama()
    save(m, tmp_path / "a", shard=None)
    data = (tmp_path / "a" / "model.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        rlsparse.diff(tmp_path / "a", tmp_path / "t.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        rlsparse.diff(tmp_path / "a", tmp_path / "c.safetensors")
    (tmp_path / "s.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        rlsparse.diff(tmp_path / "a", tmp_path / "s.safetensors")


def test_index_naming_a_missing_shard(tmp_path):
    save(tiny_llama(), tmp_path / "a")
    shard = sorted((tmp_path / "a").glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard"):
        rlsparse.diff(tmp_path / "a", tmp_path / "a")


def test_chunk_size_does_not_change_results(tiny_pair):
    base, ft = tiny_pair
    big = rlsparse.diff(base, ft).to_json()
    small = rlsparse.diff(base, ft, chunk_elements=8).to_json()
    for k in ("total", "by_type", "tensors", "abs_delta_hist"):
        assert big[k] == small[k]
    assert np.isclose(big["total"]["sparsity"]["0"], small["total"]["sparsity"]["0"])


def test_hub_id_offline_fails_clearly_and_bin_folder_works(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="hub"):
        rlsparse.diff("some-org/some-model-that-is-not-local", "some-org/other")
    m = tiny_llama()
    (tmp_path / "bin").mkdir()
    torch.save(m.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    save(m, tmp_path / "st")
    r = rlsparse.diff(tmp_path / "bin", tmp_path / "st")
    assert r.inputs["base"]["layout"] == "pytorch" and r.total.changed["0"] == 0
    assert r.total.bit_changed == 0 and r.total.numel == sum(p.numel() for p in m.state_dict().values())
