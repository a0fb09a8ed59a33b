"""Planning refuses what cannot be compared, first and clearly: different models, FP8 scales that
do not fit their weights. FP8 e5m2 with block scales is read exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import rlsparse
from tinymodels import brute_changed, save, tiny_llama
from rlsparse.errors import MismatchError


def _gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64)
    return save(GPT2LMHeadModel(cfg), tmp_path / "gpt2")


@pytest.mark.parametrize("flags", [{}, {"allow_missing": True}, {"allow_missing": True, "allow_resize": True}])
def test_different_architectures_are_named_first(tmp_path, flags):
    llama = save(tiny_llama(), tmp_path / "llama")
    with pytest.raises(MismatchError, match=r"these look like different models \(base: llama.*finetuned: gpt2") as e:
        rlsparse.diff(llama, _gpt2(tmp_path), **flags)
    assert "--allow-missing" not in str(e.value) and "\n" not in str(e.value)


def test_different_sizes_of_one_architecture_are_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = save(tiny_llama(), tmp_path / "small")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96)
    big = save(LlamaForCausalLM(cfg).to(torch.bfloat16), tmp_path / "big")
    with pytest.raises(MismatchError, match="these look like different models .*hidden 32.*hidden 64"):
        rlsparse.diff(small, big, allow_resize=True)


def test_resized_vocabulary_is_not_called_a_different_model(tmp_path):
    a = save(tiny_llama(), tmp_path / "a")
    b = save(tiny_llama(vocab=100), tmp_path / "b")
    with pytest.raises(MismatchError, match="allow_resize=True") as e:
        rlsparse.diff(a, b)
    assert "different models" not in str(e.value)
    assert rlsparse.diff(a, b, allow_resize=True).total.numel > 0


def _fp8_pair(tmp_path, dtype, scale_shape, name="model.layers.0.mlp.up_proj.weight"):
    torch.manual_seed(0)
    w = (torch.randn(200, 300) * 3).to(dtype)
    w2 = w.clone()
    w2.view(torch.uint8)[5, 7] ^= 1
    s = torch.rand(*scale_shape) + 0.5
    s2 = s.clone()
    s2.view(-1)[-1] *= 2
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_file({name: w, name + "_scale_inv": s}, str(tmp_path / "a" / "model.safetensors"))
    save_file({name: w2, name + "_scale_inv": s2}, str(tmp_path / "b" / "model.safetensors"))
    return w, w2, s, s2


@pytest.mark.parametrize("scale_shape", [(1, 3), (2, 2), (2, 3, 1), (6,), (3, 3)])
def test_fp8_scales_that_do_not_fit_are_refused(tmp_path, scale_shape):
    _fp8_pair(tmp_path, torch.float8_e4m3fn, scale_shape)
    with pytest.raises(MismatchError, match=r"scale_inv.*expected \[2, 3\]") as e:
        rlsparse.diff(tmp_path / "a", tmp_path / "b")
    assert "\n" not in str(e.value)


def test_fp8_e5m2_with_block_scales(tmp_path):
    w, w2, s, s2 = _fp8_pair(tmp_path, torch.float8_e5m2, (2, 3))
    r = rlsparse.diff(tmp_path / "a", tmp_path / "b", chunk_elements=300 * 128)
    t = r.tensors["model.layers.0.mlp.up_proj.weight"]
    deq = lambda w, s: w.float() * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    for label, tol in zip(r.labels, r.tolerances):
        assert t.changed[label] == int(brute_changed(deq(w, s), deq(w2, s2), tol).sum()), label
    assert t.bit_changed == 1 and t.dtypes == ("F8_E5M2", "F8_E5M2")
