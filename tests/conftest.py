"""Shared test helpers: tiny models built in process, saved with small shards."""

from __future__ import annotations

import os

import pytest
import torch

from tinymodels import save, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def pytest_configure(config):
    from transformers.utils import logging

    logging.disable_progress_bar()


@pytest.fixture
def tiny_pair(tmp_path):
    """A bf16 base and a finetuned copy with exactly known changes; returns (base, ft)."""
    model = tiny_llama()
    base = save(model, tmp_path / "base")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for name, t in sd.items():
        flat = t.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 7)]
        flat[idx] = (flat[idx].float() + 0.05).to(t.dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(sd[name])
    ft = save(model, tmp_path / "ft", shard="50KB")
    return base, ft
