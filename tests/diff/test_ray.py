"""Ray scale-out: the same kernels over shards on a local Ray instance, bit-identical to a local run,
including a worker killed mid-run (retried) and a path a worker cannot read."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rlsparse
from tinymodels import save, tiny_llama
from rlsparse.diff import stream
from rlsparse.diff.distributed import plan_shards, run_on_ray
from rlsparse.diff.engine import items_of, kernel_for
from rlsparse.diff.plan import plan
from rlsparse.errors import CheckpointError
from rlsparse.io.checkpoint import Checkpoint

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _ft(model, tmp: Path, name: str, seed: int, shard: str = "50KB") -> Path:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    for t in sd.values():
        flat = t.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 9)]
        flat[idx] = (flat[idx].float() + 0.03).to(t.dtype)
    m = tiny_llama()
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.copy_(sd[k])
    return save(m, tmp / name, shard=shard)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    model = tiny_llama()
    base = save(model, tmp / "base")
    return tmp, base, [_ft(model, tmp, f"ft{k}", seed=k) for k in range(3)]


def _doc(r) -> dict:
    doc = r.to_json()
    doc.pop("elapsed_s", None)
    doc["options"].pop("mask_path", None)  # the two runs write to different files
    return doc


def test_diff_on_ray_is_bit_identical(cluster, runs):
    tmp, base, fts = runs
    local = rlsparse.diff(base, fts[0], mask_path=tmp / "local.mask", chunk_elements=256)
    remote = rlsparse.diff(base, fts[0], mask_path=tmp / "ray.mask", chunk_elements=256, ray="local")
    assert json.dumps(_doc(local), sort_keys=True) == json.dumps(_doc(remote), sort_keys=True)
    assert (tmp / "local.mask").read_bytes() == (tmp / "ray.mask").read_bytes()


def test_series_and_overlap_on_ray_equal_local(cluster, runs):
    from rlsparse.analysis.overlap import overlap_from_checkpoints
    from rlsparse.analysis.series import series

    tmp, base, fts = runs
    s_local = series(base, fts, chunk_elements=256)
    s_ray = series(base, fts, chunk_elements=256, ray="local")
    a, b = s_local.to_json(), s_ray.to_json()
    assert a.pop("elapsed_s") >= 0 and b.pop("elapsed_s") >= 0
    assert a == b
    o_local = overlap_from_checkpoints(base, fts[0], base, fts[1], base, fts[2], chunk_elements=256)
    o_ray = overlap_from_checkpoints(base, fts[0], base, fts[1], base, fts[2], chunk_elements=256, ray="local")
    assert o_local.to_json() == o_ray.to_json()


@dataclasses.dataclass(frozen=True)
class _KillOnce:
    """Wraps a kernel; the first compute anywhere (marker file created atomically) kills its process."""

    inner: object
    marker: str

    def compute(self, chunk):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.inner.compute(chunk)
        os.close(fd)
        os._exit(1)  # a worker lost mid-task, as a node failure would

    def merge(self, acc, partial):
        return self.inner.merge(acc, partial)


def _pieces_run(runner, items, kernel, **kw):
    pieces = []
    out = runner(items, kernel, sink=lambda s, p: pieces.append((s.item, s.start, p.tobytes())), **kw)
    return out, pieces


def test_killed_worker_is_retried_and_result_exact(cluster, runs):
    tmp, base, fts = runs
    p = plan(Checkpoint.open(base), Checkpoint.open(fts[1]))
    items = items_of(p)
    kernel = kernel_for([0.0, 1e-5], 1e-5, None)
    local, local_pieces = _pieces_run(stream.run, items, kernel, chunk_elements=256)
    marker = tmp / "killed.marker"
    remote, remote_pieces = _pieces_run(run_on_ray, items, _KillOnce(kernel, str(marker)), chunk_elements=256,
                                        shards=6)
    assert marker.exists()  # a worker did die
    assert remote_pieces == local_pieces
    assert sorted(local.partials) == sorted(remote.partials)
    for i, acc in local.partials.items():
        other = remote.partials[i]
        assert acc.numel == other.numel and acc.bit_changed == other.bit_changed
        assert np.array_equal(acc.changed, other.changed) and np.array_equal(acc.hist, other.hist)


def test_unreadable_path_names_the_node(cluster, runs):
    tmp, base, fts = runs
    p = plan(Checkpoint.open(base), Checkpoint.open(fts[0]))
    items = items_of(p)
    gone = tmp / "elsewhere" / "model.safetensors"
    items[0] = dataclasses.replace(items[0], infos=(dataclasses.replace(items[0].infos[0], file=gone),
                                                    items[0].infos[1]))
    with pytest.raises(CheckpointError, match=r"not readable on Ray node .*shared filesystem"):
        run_on_ray(items, kernel_for([0.0], None, None), chunk_elements=256)


def test_shard_plan_is_byte_balanced_and_covers_every_span(runs):
    tmp, base, fts = runs
    items = items_of(plan(Checkpoint.open(base), Checkpoint.open(fts[0])))
    spans = stream.split(items, 256)
    ranges = plan_shards(items, spans, 8)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(spans)
    assert all(a < b and b == c for (a, b), (c, _) in zip(ranges, ranges[1:]))
    sizes = [sum(stream.span_bytes(items, s) for s in spans[a:b]) for a, b in ranges]
    total = sum(sizes)
    assert len(ranges) == 8 and max(sizes) <= 2 * total / 8


def test_cli_ray_flag_matches_local(cluster, runs, capsys):
    from rlsparse.cli.main import main

    tmp, base, fts = runs
    assert main(["diff", str(base), str(fts[2]), "--quiet", "--json", str(tmp / "l.json")]) == 0
    assert main(["diff", str(base), str(fts[2]), "--quiet", "--json", str(tmp / "r.json"), "--ray"]) == 0
    docs = [json.loads((tmp / f).read_text()) for f in ("l.json", "r.json")]
    for d in docs:
        d.pop("elapsed_s")
    assert docs[0] == docs[1]
    argv = ["overlap", "--from-checkpoints", str(base), str(fts[0]), str(base), str(fts[1]), str(base), str(fts[2]),
            "--quiet"]
    assert main([*argv, "--json", str(tmp / "ol.json")]) == 0
    assert main([*argv, "--json", str(tmp / "or.json"), "--ray"]) == 0
    assert (tmp / "ol.json").read_text() == (tmp / "or.json").read_text()
    assert len(json.loads((tmp / "or.json").read_text())["pairs"]) == 3
