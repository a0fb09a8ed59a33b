"""Tiny models and reference computations shared by the tests (built in process, offline)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(seed: int = 0, dtype=torch.bfloat16, tie: bool = False, vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype)


def save(model, path: Path, shard: str | None = "20KB") -> Path:
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def state(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint folder/file in memory with safetensors (the reference reader)."""
    from safetensors.torch import load_file

    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def brute_changed(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Obviously-correct reference: changed at t on float32-widened stored values."""
    fa, fb = a.float(), b.float()
    equal = (fa == fb) | (fa.isnan() & fb.isnan())
    d = (fb - fa).abs().double()
    return ~equal & ~(d <= t)
