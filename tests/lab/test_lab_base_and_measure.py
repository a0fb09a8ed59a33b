import pytest
import torch
from safetensors.torch import load_file, save_file

from rlsparse.errors import CheckpointError, MismatchError
from rlsparse.lab import measure
from rlsparse.lab.base import base_metadata, ensure_base


def test_base_is_a_normal_bf16_hf_folder_and_cached(tiny_base, tiny_config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (tiny_base / "model.safetensors").is_file() and (tiny_base / "tokenizer.json").is_file()
    assert tiny_base.name == f"base-{tiny_config.hash()}"
    weights = load_file(str(tiny_base / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert tok.pad_token and tok.eos_token and tok.bos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert type(model).__name__ == "LlamaForCausalLM"
    meta = base_metadata(tiny_base)
    assert meta["precision"] == {"training": "float32", "checkpoint": "bfloat16"}
    stamp = (tiny_base / "model.safetensors").stat().st_mtime_ns
    assert ensure_base(tiny_config, cache_dir=tiny_base.parent) == tiny_base
    assert (tiny_base / "model.safetensors").stat().st_mtime_ns == stamp


def test_pretraining_is_deterministic(tiny_base, tiny_config, tmp_path):
    again = ensure_base(tiny_config, cache_dir=tmp_path)
    a, b = load_file(str(tiny_base / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def _copy_with_changes(src, dst, changes):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    w = load_file(str(src / "model.safetensors"))
    for name, (index, delta) in changes.items():
        t = w[name].to(torch.float32)
        t.view(-1)[index] += delta
        w[name] = t.to(torch.bfloat16)
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return w


def test_sparsity_counts_known_changes_exactly(tiny_base, tmp_path):
    name = "model.layers.1.self_attn.q_proj.weight"
    # a change of 1.0 on elements near 0 survives bf16; count must be exactly these 3 elements
    _copy_with_changes(tiny_base, tmp_path / "ft", {name: ([0, 5, 7], 1.0)})
    r = measure.sparsity(tiny_base, tmp_path / "ft")
    numel = sum(t.numel() for t in load_file(str(tiny_base / "model.safetensors")).values())
    assert r["numel"] == numel
    assert r["changed"]["0"] == 3 and r["changed"]["1e-05"] == 3
    assert r["by_layer"]["1"]["changed"]["0"] == 3 and r["by_layer"]["0"]["changed"]["0"] == 0
    assert [k for k, v in r["by_type"].items() if v["changed"]["0"]] == ["q"]
    assert [k for k, v in r["grid"].items() if v["changed"]["0"]] == ["1|q"]
    assert r["sparsity"]["0"] == pytest.approx(1 - 3 / numel)
    mask = measure.subnetwork_mask(tiny_base, tmp_path / "ft", tmp_path / "sub.mask.safetensors")
    assert mask.count(name) == 3 and mask.ones == 3
    assert measure.changed_outside(tiny_base, tmp_path / "ft", mask) == 0


def test_sparsity_rejects_other_models(tiny_base, tmp_path):
    (tmp_path / "other").mkdir()
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(MismatchError):
        measure.sparsity(tiny_base, tmp_path / "other")
    with pytest.raises(CheckpointError):
        measure.sparsity(tiny_base, tmp_path / "nothing")


def test_changed_outside_counts_elements_moved_outside_the_mask(tiny_base, tmp_path):
    _copy_with_changes(tiny_base, tmp_path / "ft", {"model.layers.0.mlp.up_proj.weight": ([1, 2], 1.0)})
    mask = measure.subnetwork_mask(tiny_base, tmp_path / "ft", tmp_path / "m.safetensors")
    # the full model moved only inside the mask; a run that touched another element is caught
    _copy_with_changes(tiny_base, tmp_path / "other", {"model.layers.1.mlp.up_proj.weight": ([4], 1.0)})
    assert measure.changed_outside(tiny_base, tmp_path / "other", mask) == 1


def test_update_rank_of_rank_one_update(tiny_base, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    w = load_file(str(tiny_base / "model.safetensors"))
    (tmp_path / "ft").mkdir()
    for f in tiny_base.iterdir():
        (tmp_path / "ft" / f.name).write_bytes(f.read_bytes())
    # exact rank-1 update in bf16: a whole row moved by 1.0 (representable, exact)
    t = w[name].to(torch.float32)
    t[3] = t[3] + 1.0
    w[name] = t.to(torch.bfloat16)
    save_file(w, str(tmp_path / "ft" / "model.safetensors"), metadata={"format": "pt"})
    r = measure.update_rank(tiny_base, tmp_path / "ft")
    assert r["per_matrix"][name] == pytest.approx(1 / min(t.shape))
    assert r["per_matrix"]["model.layers.0.self_attn.q_proj.weight"] == 0.0


def test_base_overrides_are_typed_and_checked():
    from rlsparse.errors import UsageError
    from rlsparse.lab.base import BaseConfig

    cfg = BaseConfig().with_overrides(["hidden_size=256", "learning_rate=1e-3", "families=add,sub"])
    assert (cfg.hidden_size, cfg.learning_rate, cfg.families) == (256, 1e-3, ["add", "sub"])
    assert cfg.hash() != BaseConfig().hash()
    with pytest.raises(UsageError, match="hidden=2"):
        BaseConfig().with_overrides(["hidden=2"])
    with pytest.raises(UsageError, match="steps=many"):
        BaseConfig().with_overrides(["steps=many"])
