"""Pack and apply in forked worker processes (``diff.forked``): the same bytes as threads, bit-exact
applies, a dying worker gives one line and leaves nothing behind, memory stays bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rlsparse.delta as delta
from rlsparse.cli.main import main
from rlsparse.delta import codec
from rlsparse.diff import forked
from rlsparse.errors import PatchError, WorkerError

from deltahelpers import assert_bit_identical, bits_tensor, change, load, random_bits, write
from test_golden import GOLDEN, _write_pair

pytestmark = pytest.mark.skipif(not forked.available(), reason="needs os.fork")


def _pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Several tensors of mixed density and dtype; with small chunks they make many spans, so
    the shards cut inside tensors as well as between them."""
    rng = np.random.default_rng(seed)
    shapes = {"embed.weight": ("BF16", (96, 64), 0.004), "a.weight": ("BF16", (64, 64), 0.2),
              "b.weight": ("F32", (32, 48), 0.01), "c.weight": ("BF16", (128, 32), 0.0),
              "d.weight": ("F16", (40, 40), 0.6), "e.bias": ("BF16", (64,), 0.1)}
    base, ft = {}, {}
    for name, (code, shape, density) in shapes.items():
        n = int(np.prod(shape))
        bits = random_bits(rng, code, n, small=True)
        base[name] = bits_tensor(bits, code, shape)
        ft[name] = bits_tensor(change(rng, bits, density, ulps=True), code, shape)
    return write(root / "base", base), write(root / "ft", ft)


def test_processes_write_the_same_patch_and_apply_bit_exactly(tmp_path):
    base, ft = _pair(tmp_path)
    by_threads = delta.pack(base, ft, tmp_path / "t.rlpatch", chunk_elements=512, parallel="threads")
    by_procs = delta.pack(base, ft, tmp_path / "p.rlpatch", chunk_elements=512, parallel="processes", workers=3)
    assert (tmp_path / "t.rlpatch").read_bytes() == (tmp_path / "p.rlpatch").read_bytes()
    assert by_procs.changed == by_threads.changed > 0
    assert sum(len(e.chunks) for e in by_procs.manifest.tensors) > 3 * forked.SHARDS_PER_PROCESS  # many shards
    # several output shards: every worker writes into the files it inherited
    delta.apply(base, tmp_path / "p.rlpatch", tmp_path / "out", parallel="processes", workers=3,
                max_shard_bytes=8000)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert_bit_identical(load(tmp_path / "out"), load(ft))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no spool or temp left


def test_golden_bytes_and_golden_apply_in_processes(tmp_path):
    base, ft = _write_pair(tmp_path)
    delta.pack(base, ft, tmp_path / "p.rlpatch", chunk_elements=1024, parallel="processes")
    with delta.PatchReader.open(GOLDEN) as g, delta.PatchReader.open(tmp_path / "p.rlpatch") as p:
        assert [vars(e) for e in p.manifest.tensors] == [vars(e) for e in g.manifest.tensors]
        assert p.read(0, p.size) == g.read(0, g.size)  # every coded byte
    delta.apply(base, GOLDEN, tmp_path / "out", parallel="processes")
    assert_bit_identical(load(tmp_path / "out"), load(ft))


def test_auto_chooses_processes_only_for_large_checkpoints():
    assert delta.pack.__module__  # the choice itself is a pure function
    from rlsparse.delta.pack import AUTO_PROCESS_BYTES, use_processes

    assert use_processes("auto", 2, AUTO_PROCESS_BYTES) and not use_processes("auto", 2, AUTO_PROCESS_BYTES - 1)
    assert not use_processes("auto", 1, 10 * AUTO_PROCESS_BYTES)
    assert use_processes("processes", 1, 0) and not use_processes("threads", 2, 10 * AUTO_PROCESS_BYTES)
    with pytest.raises(Exception, match="expected one of auto, threads, processes"):
        use_processes("fibres", 2, 0)


def _die_in_worker(monkeypatch, target, name):
    parent = os.getpid()
    real = getattr(target, name)

    def dying(*args, **kwargs):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, dying)


def test_a_worker_that_dies_during_pack_leaves_no_patch(tmp_path, monkeypatch, capsys):
    base, ft = _pair(tmp_path)
    _die_in_worker(monkeypatch, codec, "encode_chunk")
    with pytest.raises(WorkerError, match=r"worker process rlsparse-pack-\d .*killed by signal 9 \(SIGKILL\)"):
        delta.pack(base, ft, tmp_path / "p.rlpatch", chunk_elements=512, parallel="processes")
    rc = main(["delta", "pack", str(base), str(ft), "-o", str(tmp_path / "p.rlpatch"), "--parallel", "processes",
               "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--parallel threads" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]  # no patch, no spool, no temporary


def test_a_worker_that_dies_during_apply_leaves_no_folder(tmp_path, monkeypatch, capsys):
    base, ft = _pair(tmp_path)
    delta.pack(base, ft, tmp_path / "p.rlpatch", chunk_elements=512)
    _die_in_worker(monkeypatch, codec, "decode_chunk")
    rc = main(["delta", "apply", str(base), str(tmp_path / "p.rlpatch"), "-o", str(tmp_path / "out"),
               "--parallel", "processes", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "rlsparse-apply-" in err and "killed by signal 9" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "p.rlpatch"]


def test_an_error_in_a_worker_is_raised_in_the_parent(tmp_path):
    """A corrupt chunk is found by a worker's decoder or by the parent's hash check: either way
    the same PatchError as with threads, and no folder."""
    base, ft = _pair(tmp_path)
    delta.pack(base, ft, tmp_path / "p.rlpatch", chunk_elements=512)
    reader = delta.PatchReader.open(tmp_path / "p.rlpatch")
    entry = max(reader.manifest.tensors, key=lambda e: e.nbytes)
    start = reader.segments[0].start + entry.offset
    reader.close()
    data = bytearray((tmp_path / "p.rlpatch").read_bytes())
    for i in range(start, start + entry.nbytes):
        data[i] ^= 0x5A
    (tmp_path / "bad.rlpatch").write_bytes(bytes(data))
    with pytest.raises(PatchError, match="corrupt|damaged"):
        delta.apply(base, tmp_path / "bad.rlpatch", tmp_path / "out", parallel="processes")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


MEMORY = """
import json, resource, sys, numpy as np, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from deltahelpers import bits_tensor, write
import rlsparse.delta as delta
root = Path({root!r})
rng = np.random.default_rng(0)
n = 24 * 1024 * 1024  # 48 MB of bf16 per side, in 6 tensors
base, ft = {{}}, {{}}
for i in range(6):
    b = rng.integers(0, 1 << 16, n // 6, dtype=np.uint16)
    f = b.copy()
    f[rng.integers(0, b.size, b.size // 100)] += 1
    base[f"t{{i}}"] = bits_tensor(b, "BF16", (b.size // 1024, 1024))
    ft[f"t{{i}}"] = bits_tensor(f, "BF16", (b.size // 1024, 1024))
write(root / "base", base); write(root / "ft", ft)
del base, ft, b, f
import multiprocessing
child = multiprocessing.get_context("fork").Process(target=int)  # a worker that does nothing: its peak is the
child.start(); child.join()                                     # resident set a fork starts from
at_fork = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
delta.pack(root / "base", root / "ft", root / "p.rlpatch", chunk_elements=256 * 1024, parallel="processes")
delta.apply(root / "base", root / "p.rlpatch", root / "out", parallel="processes")
print(json.dumps({{"at_fork": at_fork, "workers_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_worker_memory_is_bounded_by_the_chunks_not_the_model(tmp_path):
    """Each worker's peak resident set grows by far less than the 48 MB checkpoint it codes
    (it maps the files and drops each chunk's pages after use): measured in a fresh process,
    so no other child of the test run counts."""
    code = MEMORY.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["workers_peak"] - got["at_fork"] < 32 << 20, got


@pytest.mark.parametrize("parallel", ["threads", "processes"])
def test_direct_and_cached_writes_make_the_same_folder(tmp_path, parallel):
    """O_DIRECT for whole pages (chunks decoded in write-behind buffers placed at their file
    phase) and the page cache give byte-identical files; the direct run really wrote directly."""
    from rlsparse.delta.apply import spans_of
    from rlsparse.io import safetensors_format

    rng = np.random.default_rng(3)
    shapes = {"embed.weight": ("BF16", (300, 64), 0.05), "a.weight": ("F32", (97, 130), 0.3),
              "b.weight": ("BF16", (5,), 1.0), "c.weight": ("F16", (512, 40), 0.0)}
    base, ft = {}, {}
    for name, (code, shape, density) in shapes.items():
        bits = random_bits(rng, code, int(np.prod(shape)), small=True)
        base[name] = bits_tensor(bits, code, shape)
        ft[name] = bits_tensor(change(rng, bits, density, ulps=True), code, shape)
    b, f = write(tmp_path / "base", base), write(tmp_path / "ft", ft)
    patch = tmp_path / "p.rlpatch"
    delta.pack(b, f, patch, chunk_elements=5000)  # chunks of 10-20 KB: whole pages and partial ones
    written = []
    real_init = safetensors_format.StreamingSafetensorsWriter.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        written.append(self)

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(safetensors_format.StreamingSafetensorsWriter, "__init__", spy)
    try:
        delta.apply(b, patch, tmp_path / "cached", parallel=parallel, workers=2, direct=False)
        delta.apply(b, patch, tmp_path / "direct", parallel=parallel, workers=2, direct=True)
    finally:
        monkeypatch.undo()
    assert [w.direct for w in written] == [False, True]
    if parallel == "threads":  # (forked workers count their own direct bytes)
        w = written[1]
        manifest = delta.PatchReader.open(patch).manifest
        whole_pages = 0  # every chunk's pages that lie wholly inside it
        for e in manifest.tensors:
            size = {"BF16": 2, "F16": 2, "F32": 4}[e.dtype]
            for start, count in spans_of(e):
                lo, hi = w.data_offset(e.name, start * size), w.data_offset(e.name, (start + count) * size)
                whole_pages += max(0, hi // 4096 - -(-lo // 4096)) * 4096
        assert written[0].direct_bytes == 0 and w.direct_bytes == whole_pages > 0
    for name in ("model.safetensors",):
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "cached" / name).read_bytes()
    assert_bit_identical(load(tmp_path / "direct"), load(f))


def test_cli_writes_flag_chooses_the_write_path_and_says_so(tmp_path, capsys):
    base, ft = _pair(tmp_path)
    patch = tmp_path / "p.rlpatch"
    delta.pack(base, ft, patch)
    said = {}
    for writes in ("direct", "cached", "auto"):
        assert main(["delta", "apply", str(base), str(patch), "-o", str(tmp_path / writes), "--writes", writes]) == 0
        said[writes] = capsys.readouterr().out
        assert_bit_identical(load(tmp_path / writes), load(ft))
    assert "written with O_DIRECT" in said["direct"]
    assert "O_DIRECT" not in said["cached"] and "O_DIRECT" not in said["auto"]  # auto: a small model, cached
    files = [(tmp_path / w / "model.safetensors").read_bytes() for w in ("direct", "cached", "auto")]
    assert files[0] == files[1] == files[2]
    with pytest.raises(SystemExit) as bad:
        main(["delta", "apply", str(base), str(patch), "-o", str(tmp_path / "x"), "--writes", "sometimes"])
    assert bad.value.code == 2 and "invalid choice: 'sometimes'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
