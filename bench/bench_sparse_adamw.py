"""SparseAdamW vs dense AdamW: optimizer-state bytes, step time and peak memory, on CPU.

One run, dense beside sparse, on a ~100M-parameter Llama-shaped set of tensors (embeddings,
8 decoder layers, untied head) with random masks at densities 5%, 20% and 50%. Each optimizer
runs in its own process so that peak RSS is its own. Targets (issue #4): state bytes at most
density + 5% of dense AdamW's; step time at 20% density no worse than dense AdamW.

    python bench/bench_sparse_adamw.py [--steps 3] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _shapes(layers: int, hidden: int = 768, ffn: int = 2048, vocab: int = 32000):
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (ffn, hidden)), (p + "mlp.up_proj.weight", (ffn, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, ffn)),
                   (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def _worker(kind: str, density: float, steps: int, layers: int) -> dict:
    import torch

    from rlsparse.masks import Mask
    from rlsparse.train import SparseAdamW

    g = torch.Generator().manual_seed(0)
    named = []
    for name, shape in _shapes(layers):
        p = torch.nn.Parameter(torch.empty(shape).normal_(0, 0.02, generator=g))
        p.grad = torch.empty(shape).normal_(0, 1e-3, generator=g)
        named.append((name, p))
    numel = sum(p.numel() for _, p in named)
    if kind.startswith("sparse"):
        mask = Mask.from_tensors({n: torch.rand(p.shape, generator=g) < density for n, p in named})
        opt = SparseAdamW(named, mask, lr=1e-4, weight_decay=0.0, fused=(kind == "sparse-fused"))
    else:
        opt = torch.optim.AdamW([p for _, p in named], lr=1e-4, weight_decay=0.0, fused=(kind == "fused"))
    opt.step()  # state is created lazily: warm up once, then time
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"numel": numel, "state_bytes": state, "step_s": min(times), "peak_rss": peak}


def _run(kind, density, steps, layers):
    cmd = [sys.executable, __file__, "--worker", kind, "--density", str(density), "--steps", str(steps),
           "--layers", str(layers)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--worker", choices=["dense", "fused", "sparse", "sparse-fused"])
    parser.add_argument("--density", type=float, default=0.2)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.density, args.steps, args.layers)))
        return
    gib = 2**30
    dense = _run("dense", 0, args.steps, args.layers)
    fused = _run("fused", 0, args.steps, args.layers)
    print(f"model: {dense['numel'] / 1e6:.1f}M fp32 parameters; best of {args.steps} steps after one warm-up")
    print(f"dense AdamW (foreach off, torch's CPU default): state {dense['state_bytes'] / gib:.3f} GiB, "
          f"step {dense['step_s']:.3f} s, peak RSS {dense['peak_rss'] / gib:.2f} GiB")
    print(f"dense AdamW fused=True (Trainer's adamw_torch_fused): step {fused['step_s']:.3f} s, "
          f"peak RSS {fused['peak_rss'] / gib:.2f} GiB")
    print("step ratio = SparseAdamW step time / dense step time (below 1: faster)")
    print(f"{'SparseAdamW':>12} {'density':>8} {'state ratio':>12} {'target <=':>10} {'vs dense':>9} "
          f"{'vs fused':>9} {'peak RSS':>9}")
    for kind in ("sparse", "sparse-fused"):
        for density in (0.05, 0.2, 0.5):
            r = _run(kind, density, args.steps, args.layers)
            ratio = r["state_bytes"] / dense["state_bytes"]
            flag = "ok" if ratio <= density + 0.05 else "OVER"
            name = "fused kernel" if kind == "sparse-fused" else "single-tensor"
            print(f"{name:>13} {density:>7.0%} {ratio:>12.4f} {density + 0.05:>10.2f} "
                  f"{r['step_s'] / dense['step_s']:>9.2f} {r['step_s'] / fused['step_s']:>9.2f} "
                  f"{r['peak_rss'] / gib:>8.2f}G  {flag}")


if __name__ == "__main__":
    main()
