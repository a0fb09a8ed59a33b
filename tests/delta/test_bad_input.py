"""Every bad input: a one-line error of the right type, exit code 2, nothing half-written."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlsparse.delta as delta
from rlsparse.cli.main import main
from rlsparse.errors import MismatchError, PatchError


@pytest.fixture
def packed(tmp_path, tiny_pair):
    base, ft = tiny_pair
    delta.pack(base, ft, tmp_path / "p.rlpatch")
    return base, ft, tmp_path / "p.rlpatch"


def _cli(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_wrong_base_names_the_first_differing_tensor(tmp_path, packed, capsys):
    base, ft, patch = packed
    from safetensors.torch import load_file, save_file

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in base.iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    shard = sorted(wrong.glob("*.safetensors"))[0]
    sd = load_file(str(shard))
    victim = sorted(sd)[0]
    sd[victim].view(-1)[0] += 1
    save_file(sd, str(shard), metadata={"format": "pt"})
    with pytest.raises(MismatchError, match=f"first differing tensor: {victim}"):
        delta.apply(wrong, patch, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    rc, err = _cli(["delta", "apply", str(wrong), str(patch), "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and victim in err
    # a base with another tensor set is refused before any data is read
    rc, err = _cli(["delta", "apply", str(ft), str(patch), "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and "not the base" in err


def test_base_with_other_tensor_set_is_refused_upfront(tmp_path, packed):
    _, _, patch = packed
    from safetensors.torch import save_file

    other = tmp_path / "other"
    other.mkdir()
    save_file({"x": torch.zeros(3)}, str(other / "model.safetensors"))
    with pytest.raises(MismatchError, match="first difference"):
        delta.apply(other, patch, tmp_path / "out")


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_patch(tmp_path, packed, capsys, cut):
    base, _, patch = packed
    data = patch.read_bytes()
    bad = tmp_path / "bad.rlpatch"
    bad.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(PatchError, match="truncated"):
        delta.apply(base, bad, tmp_path / "out")
    rc, err = _cli(["delta", "inspect", str(bad)], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "truncated" in err


def test_corrupt_patch_is_caught_by_the_result_hash(tmp_path, packed):
    base, _, patch = packed
    data = bytearray(patch.read_bytes())
    reader = delta.PatchReader.open(patch)
    entry = max(reader.manifest.tensors, key=lambda e: e.nbytes)
    start = reader.segments[0].start + entry.offset
    reader.close()
    for i in range(start + entry.nbytes // 2, start + entry.nbytes // 2 + 8):
        data[i] ^= 0x5A
    bad = tmp_path / "bad.rlpatch"
    bad.write_bytes(bytes(data))
    with pytest.raises(PatchError, match="corrupt"):
        delta.apply(base, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_not_a_patch_and_newer_schema(tmp_path, packed, capsys):
    base, ft, patch = packed
    shard = sorted(Path(base).glob("*.safetensors"))[0]
    with pytest.raises(PatchError, match="not an rlsparse patch"):
        delta.inspect(shard)
    data = patch.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["schema_version"] = "99"
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))  # same length: offsets stay valid
    newer = tmp_path / "newer.rlpatch"
    newer.write_bytes(data[:8] + raw + data[8 + n:])
    rc, err = _cli(["delta", "apply", str(base), str(newer), "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and "schema version 99 is newer" in err and "upgrade" in err


def test_existing_and_unwritable_outputs(tmp_path, packed, capsys):
    base, ft, patch = packed
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _cli(["delta", "apply", str(base), str(patch), "-o", str(out)], capsys)
    assert rc == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    rc, err = _cli(["delta", "pack", str(base), str(ft), "-o", str(patch)], capsys)
    assert rc == 2 and "--overwrite" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = _cli(["delta", "apply", str(base), str(patch), "-o", str(blocker / "out")], capsys)
    assert rc == 2 and "does not exist" in err
    rc, err = _cli(["delta", "pack", str(base), str(ft), "-o", str(blocker / "p.rlpatch")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert main(["delta", "apply", str(base), str(patch), "-o", str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("writes", ["cached", "direct"])
def test_disk_full_during_apply_leaves_nothing(tmp_path, packed, writes):
    """The apply runs in a child whose file-size limit is below the model size: writes fail
    with EFBIG, as on a full disk (direct: in a worker's write-behind thread, handed back)."""
    base, _, patch = packed
    out = tmp_path / "out"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "from rlsparse.cli.main import main\n"
        f"sys.exit(main(['delta', 'apply', {str(base)!r}, {str(patch)!r}, '-o', {str(out)!r}, '--quiet',"
        f" '--writes', {writes!r}]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "writing failed (File too large)" in proc.stderr
    assert f"error: {out}: " in proc.stderr  # the folder asked for, not the temporary one
    assert not out.exists() and _leftovers(tmp_path) == []
