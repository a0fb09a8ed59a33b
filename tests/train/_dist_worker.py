"""Runs in each spawned process of the distributed tests (gloo on CPU, 2 ranks).

DDP goes through accelerate. accelerate refuses FSDP on CPU, so FSDP2 is set up the way
accelerate sets it up on GPUs: ``fully_shard`` on each decoder layer, then on the root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def run(rank: int, world: int, backend: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), ACCELERATE_USE_CPU="true")
    if backend == "fsdp2":
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    results = {order: _train(backend, order, rank) for order in ("after_clip", "before_clip")}
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def _train(backend: str, order: str, rank: int) -> dict:
    from torch.distributed.tensor import DTensor

    from trainhelpers import make_model, random_mask
    from rlsparse.train import attach_mask
    from rlsparse.train.masking import _local

    model = make_model()
    mask = random_mask(model, density=0.3)
    if backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        accelerator = None
    else:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
    handle = attach_mask(model, mask, optimizer, order=order)
    start = handle.snapshot()
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for micro in range(4):  # 2 optimizer steps of 2 accumulated micro-batches
        ids = torch.randint(4, 60, (2, 8), generator=g)
        if accelerator is not None:
            with accelerator.accumulate(model):
                accelerator.backward(model(input_ids=ids, labels=ids).loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
        else:
            model(input_ids=ids, labels=ids).loss.backward()
            if micro % 2 == 1:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
    handle.verify(start)  # raises if a masked-out element moved
    changed = sum(int((_local(m.param).detach() != start[m.name]).sum()) for m in handle.params if m.name in start)
    with torch.no_grad():
        finite = all(bool(torch.isfinite(_local(p)).all()) for p in model.parameters())
        digest = float(sum(_local(p).double().sum() for p in model.parameters()))
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    handle.detach()
    return {"changed": changed, "finite": finite, "digest": digest, "sharded": sharded}
