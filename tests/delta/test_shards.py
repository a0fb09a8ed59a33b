"""A patch as a folder of shards: bit-exact round trips through every consumer, and every way a
folder can be broken refused with one line, exit code 2, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import rlsparse.delta as delta
from rlsparse.cli.main import main
from rlsparse.delta.format import PatchReader
from rlsparse.delta.shards import INDEX
from rlsparse.errors import MismatchError, PatchError

from deltahelpers import assert_bit_identical, load

TINY_SHARD = 3000  # bytes of coded data per shard: the tiny pair's patch needs several


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("patch-*.rlpatch"))


@pytest.fixture
def sharded(tmp_path, tiny_pair):
    base, ft = tiny_pair
    res = delta.pack(base, ft, tmp_path / "p.rlpatch", shard_bytes=TINY_SHARD)
    return base, ft, res


def _cli(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


def _apply_fails(base, patch, tmp_path, capsys, match: str) -> None:
    out = tmp_path / "out"
    rc, err = _cli(["delta", "apply", str(base), str(patch), "-o", str(out), "--quiet"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and match in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_sharded_patch_round_trips_bit_exactly(tmp_path, sharded):
    base, ft, res = sharded
    folder = res.path
    shards = _shards(folder)
    index = json.loads((folder / INDEX).read_text())
    assert folder.is_dir() and len(shards) == len(index["shards"]) >= 3
    assert [s["file"] for s in index["shards"]] == [p.name for p in shards]
    # every shard but the last is full up to the limit (cut between chunk codes), the data tiles
    sizes = [s["data_bytes"] for s in index["shards"]]
    assert all(0 < n <= TINY_SHARD for n in sizes[:-1]) and sum(sizes) == index["data_bytes"]
    # the same data as the one-file form, byte for byte
    one = delta.pack(base, ft, tmp_path / "one.rlpatch", shard_bytes=None)
    assert one.path.is_file()
    with PatchReader.open(folder) as p, PatchReader.open(one.path) as q:
        assert p.size == q.size and p.read(0, p.size) == q.read(0, q.size)
        assert [vars(e) for e in p.manifest.tensors] == [vars(e) for e in q.manifest.tensors]
    delta.apply(base, folder, tmp_path / "out")
    assert_bit_identical(load(tmp_path / "out"), load(ft))
    assert (tmp_path / "out" / "config.json").read_bytes() == (ft / "config.json").read_bytes()
    sd = load(base)
    delta.apply_to_state_dict(sd, folder)
    assert_bit_identical(sd, load(ft))
    assert delta.inspect(folder)["total"] == delta.inspect(one.path)["total"]


def test_cli_writes_a_folder_above_the_shard_size(tmp_path, tiny_pair, capsys):
    base, ft = tiny_pair
    patch = tmp_path / "p.rlpatch"
    assert main(["delta", "pack", str(base), str(ft), "-o", str(patch), "--shard-size", str(TINY_SHARD)]) == 0
    assert "shards" in capsys.readouterr().out and patch.is_dir() and len(_shards(patch)) >= 3
    assert main(["delta", "inspect", str(patch), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["changed"] > 0
    # --overwrite replaces the folder by one file (and back)
    assert main(["delta", "pack", str(base), str(ft), "-o", str(patch), "--overwrite", "--quiet"]) == 0
    assert patch.is_file()
    assert main(["delta", "pack", str(base), str(ft), "-o", str(patch), "--overwrite", "--quiet",
                 "--shard-size", str(TINY_SHARD)]) == 0
    assert patch.is_dir()
    assert main(["delta", "apply", str(base), str(patch), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    assert_bit_identical(load(tmp_path / "out"), load(ft))


def test_wrong_base_is_refused(tmp_path, sharded, capsys):
    _, ft, res = sharded
    with pytest.raises(MismatchError, match="not the base"):
        delta.apply(ft, res.path, tmp_path / "out")
    _apply_fails(ft, res.path, tmp_path, capsys, "not the base")


def test_truncated_shard_is_refused(tmp_path, sharded, capsys):
    base, _, res = sharded
    victim = _shards(res.path)[1]
    os.truncate(victim, victim.stat().st_size - 10)
    with pytest.raises(PatchError, match="truncated"):
        PatchReader.open(res.path)
    _apply_fails(base, res.path, tmp_path, capsys, f"shard {victim.name} (2 of")


def test_missing_shard_is_refused(tmp_path, sharded, capsys):
    base, _, res = sharded
    victim = _shards(res.path)[-1]
    victim.unlink()
    _apply_fails(base, res.path, tmp_path, capsys, f"{victim.name} (")
    rc, err = _cli(["delta", "inspect", str(res.path)], capsys)
    assert rc == 2 and "is missing" in err and len(err.splitlines()) == 1


def test_shard_from_another_patch_is_refused(tmp_path, sharded, tiny_pair, capsys):
    base, ft, res = sharded
    other = delta.pack(ft, base, tmp_path / "other.rlpatch", shard_bytes=TINY_SHARD)  # the reverse patch
    ours, theirs = _shards(res.path), _shards(other.path)
    assert len(ours) > 1 and len(theirs) > 1
    theirs[1].replace(ours[1])  # a shard of the other patch under our shard's name
    with pytest.raises(PatchError, match="belongs to another patch"):
        PatchReader.open(res.path)
    _apply_fails(base, res.path, tmp_path, capsys, "belongs to another patch")


def test_damaged_index_and_lone_shard_are_refused(tmp_path, sharded, capsys):
    base, _, res = sharded
    first = _shards(res.path)[0]
    with pytest.raises(PatchError, match="is shard 1 of .* give the folder"):
        PatchReader.open(first)
    index = res.path / INDEX
    doc = json.loads(index.read_text())
    doc["shards"][0]["data_bytes"] += 1
    index.write_text(json.dumps(doc))
    _apply_fails(base, res.path, tmp_path, capsys, "malformed")
    doc["shards"][0]["data_bytes"] -= 1
    doc["schema_version"] = 99
    index.write_text(json.dumps(doc))
    _apply_fails(base, res.path, tmp_path, capsys, "upgrade rlsparse")
    index.unlink()
    _apply_fails(base, res.path, tmp_path, capsys, f"without {INDEX}")


def test_bad_shard_size_is_a_usage_error(tmp_path, tiny_pair, capsys):
    base, ft = tiny_pair
    for bad in ("lots", "-1"):
        rc, err = _cli(["delta", "pack", str(base), str(ft), "-o", str(tmp_path / "p.rlpatch"), "--shard-size", bad],
                       capsys)
        assert rc == 2 and "--shard-size" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p.rlpatch").exists()


@pytest.mark.parametrize("in_memory", [False, True])
def test_copy_spool_copies_consecutive_ranges_behind_what_was_written(tmp_path: Path, in_memory):
    # The patch's data goes from its spool behind a header (kernel copy between files, or
    # through memory from an in-memory spool), range after range for a folder of shards.
    import io
    import tempfile

    from rlsparse.delta.format import copy_spool

    data = os.urandom(3 * (1 << 20) + 12345)
    spool = io.BytesIO() if in_memory else tempfile.TemporaryFile(dir=tmp_path)
    spool.write(data)
    spool.seek(0)
    cuts = [0, 1000, 1 << 20, len(data)]
    for i in range(len(cuts) - 1):
        with open(tmp_path / f"part{i}", "wb") as out:
            out.write(b"head%d" % i)
            copy_spool(spool, out, cuts[i + 1] - cuts[i])
            out.write(b"tail")
        assert (tmp_path / f"part{i}").read_bytes() == b"head%d" % i + data[cuts[i]:cuts[i + 1]] + b"tail"
    assert spool.tell() == len(data)
    with open(tmp_path / "short", "wb") as out, pytest.raises(OSError, match="early"):
        copy_spool(spool, out, 1)  # nothing left
    spool.close()
