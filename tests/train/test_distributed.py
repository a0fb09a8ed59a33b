"""Masked training under accelerate with DDP and FSDP2: 2 CPU processes over gloo."""

from __future__ import annotations

import json
import socket

import pytest
import torch.multiprocessing as mp

from _dist_worker import run

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_masked_out_elements_stay_put_across_ranks(tmp_path, backend):
    # each rank trains with both orders, verifies its own parameters (shards under FSDP2), reports
    mp.spawn(run, args=(2, backend, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for order in ("after_clip", "before_clip"):
        results = [r[order] for r in ranks]
        assert all(r["finite"] and r["changed"] > 0 for r in results)
        assert all(r["sharded"] == (backend == "fsdp2") for r in results)
        if backend == "ddp":
            assert results[0]["digest"] == results[1]["digest"]  # replicas stay in sync
