"""Synthetic Llama-shaped bf16 checkpoint pairs for benchmarks (written straight to safetensors).

The finetuned side changes a fixed fraction of elements (default 20%, RL-like) by 1-3 bf16
units in the last place (a position drawn twice moves by the sum), plus a few larger moves, so the
diff does real work at every tolerance. The same arguments write the same bytes in every process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path



def llama_shapes(hidden: int, inter: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def config_for(target_params: float) -> dict:
    """A Llama config (hidden 2048, MLP 5632, vocab 32000) with enough layers for ``target_params``."""
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((target_params - 2 * vocab * hidden) / per_layer))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "dtype": "bfloat16"}


def write_pair(root: Path, target_params: float, density: float = 0.2, shard_bytes: int = 2 * 10**9,
               seed: int = 0) -> tuple[Path, Path, int]:
    """Write base/ and finetuned/ under ``root`` (reused when present); returns (base, ft, params)."""
    import torch  # here, not at the top: the benches that only use ``warm`` / ``evict`` do not pay for it
    from safetensors.torch import save_file

    cfg = config_for(target_params)
    shapes = llama_shapes(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"])
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    base, ft = root / "base", root / "finetuned"
    done = root / "DONE"
    if done.exists() and json.loads(done.read_text()) == {"params": numel, "density": density}:
        return base, ft, numel
    for d in (base, ft):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=1))
    g = torch.Generator().manual_seed(seed)
    shard_a: dict[str, torch.Tensor] = {}
    shard_b: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    size = 0
    nshard = 0

    def flush():
        nonlocal shard_a, shard_b, size, nshard
        if not shard_a:
            return
        nshard += 1
        name = f"model-{nshard:05d}.safetensors"
        save_file(shard_a, str(base / name), metadata={"format": "pt"})
        save_file(shard_b, str(ft / name), metadata={"format": "pt"})
        for k in shard_a:
            weight_map[k] = name
        shard_a, shard_b, size = {}, {}, 0

    for name, shape in shapes.items():
        if len(shape) == 1:
            a = torch.ones(shape, dtype=torch.bfloat16)
        else:
            a = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        b = a.clone()
        flat = b.view(-1).view(torch.int16)
        k = int(flat.numel() * density)
        idx = torch.randint(0, flat.numel(), (k,), generator=g)
        # accumulate: a position drawn twice moves by the sum; a plain `flat[idx] +=` keeps one of the
        # duplicate writes, whichever thread lands last, so the pair differed from run to run
        flat.index_put_((idx,), torch.randint(1, 4, (k,), generator=g, dtype=torch.int16), accumulate=True)
        shard_a[name], shard_b[name] = a, b
        size += a.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    for d in (base, ft):
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": numel * 2}, "weight_map": weight_map}))
    done.write_text(json.dumps({"params": numel, "density": density}))
    return base, ft, numel


def evict(paths: list[Path]) -> None:
    """Drop files from the page cache (cold-cache runs) without root: POSIX_FADV_DONTNEED."""
    for p in paths:
        for f in (p.rglob("*") if p.is_dir() else [p]):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def warm(paths) -> None:
    """Read files once so the page cache holds them (warm-cache runs): each path a file, or a
    folder whose safetensors files are read."""
    for p in map(Path, paths):
        for f in ([p] if p.is_file() else sorted(p.rglob("*.safetensors"))):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
