"""Each spawned rank of the gloo sync test: rank 0 trains and sends patches, rank 1 applies them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def run(rank: int, port: int, out: str, steps: int) -> None:
    from rlsparse.delta.sync import SyncReceiver, SyncSender
    from rlsparse.delta.transport import GlooTransport
    from tinymodels import tiny_llama

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    model = tiny_llama(dtype=torch.float32)  # same seed on both ranks: same starting weights
    if rank == 0:
        sender, link = SyncSender(model), GlooTransport(peer=1)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            ids = torch.randint(0, 96, (2, 10), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            link.send(sender.sync(model)[0])
    else:
        model = model.to(torch.bfloat16)
        rx, link = SyncReceiver(model), GlooTransport(peer=0)
        for _ in range(steps):
            rx.receive(link.receive())
    bits = {n: t.detach().to(torch.bfloat16).view(torch.int16).flatten().tolist() for n, t in model.state_dict().items()}
    Path(out, f"{rank}.json").write_text(json.dumps({"bits": bits}))
    torch.distributed.destroy_process_group()
