"""Tiny checkpoints with hand-made updates, for the analysis tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tinymodels import brute_changed, save, state, tiny_llama  # noqa: F401 (re-exported to the tests)


def write(sd: dict[str, torch.Tensor], like: Path, path: Path, shard: str = "20KB", dtype=torch.bfloat16) -> Path:
    """Save ``sd`` as a model folder (a tiny Llama with the same config as ``like``)."""
    model = tiny_llama(dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(sd[name])
    return save(model, path, shard=shard)


def base_model(tmp_path: Path, dtype=torch.bfloat16, name: str = "base") -> tuple[Path, dict[str, torch.Tensor]]:
    model = tiny_llama(dtype=dtype)
    path = save(model, tmp_path / name)
    return path, state(path)


def bump(sd: dict[str, torch.Tensor], chosen: dict[str, torch.Tensor], amount: float = 0.25) -> dict[str, torch.Tensor]:
    """A copy of ``sd`` with the elements where ``chosen[name]`` is True moved by ``amount``
    (large enough to change every bf16 value by far more than 1e-5)."""
    out = {k: v.clone() for k, v in sd.items()}
    for name, m in chosen.items():
        t = out[name]
        t[m] = (t[m].float() + amount).to(t.dtype)
    return out


def random_choice(sd: dict[str, torch.Tensor], density: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) < density for k, v in sd.items()}
