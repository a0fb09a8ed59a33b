"""Realistic checkpoint pairs from a real bf16 base: a few AdamW steps of causal-LM training in
fp32 master weights, each step's weights saved in bf16 (what an RL trainer ships to inference).

    python bench/real_pairs.py /work/labcache/real-smollm2-135m-* /tmp/delta-real --steps 30 --lr 1e-6 --save 1,2,30

Writes OUT/step-K/ (HF folders, config and tokenizer copied) and OUT/base -> the base folder.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

TEXTS = [
    "What is 12 + 35? The answer is 47.", "What is 8 + 9? The answer is 17.",
    "The capital of France is Paris.", "Water boils at 100 degrees Celsius at sea level.",
    "What is 23 + 19? Let me add: 23 + 19 = 42.", "A triangle has three sides and three angles.",
    "What is 7 times 6? It is 42.", "Which is larger, 15 or 51? 51 is larger.",
]


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--save", default="1,2,30")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save = {int(s) for s in args.save.split(",")}
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step} loss {loss.item():.4f} {time.perf_counter() - t0:.1f}s", flush=True)
        if step in save:
            d = out / f"step-{step}"
            copy.deepcopy(model).to(torch.bfloat16).save_pretrained(d)  # the fp32 master weights stay
            tok.save_pretrained(d)
    if not (out / "base").exists():
        (out / "base").symlink_to(Path(args.base).resolve())


if __name__ == "__main__":
    main()
