"""Hostile or malformed checkpoints: an index cannot reach outside its folder, shards and index
must agree, FIFOs never block, unsafe or odd .bin files get a plain one-line refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import save_file

from rlsparse.errors import CheckpointError
from rlsparse.io.checkpoint import Checkpoint, weight_patterns


def _folder(tmp_path, name="ck"):
    folder = tmp_path / name
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(folder / "s2.safetensors"))
    return folder


def _index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _refused(source, match):
    with pytest.raises(CheckpointError, match=match) as err:
        Checkpoint.open(source)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_index_naming_a_file_outside_is_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    folder = _folder(tmp_path)
    for name in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        _index(folder, {"a": "s1.safetensors", "b": name})
        msg = _refused(folder, "outside")
        assert "3475222254926655346" not in msg and "root:x" not in msg


def test_symlinked_shard_leading_outside_is_refused(tmp_path):
    outside = _folder(tmp_path, "elsewhere") / "s2.safetensors"
    folder = _folder(tmp_path)
    (folder / "s2.safetensors").unlink()
    (folder / "s2.safetensors").symlink_to(outside)
    _index(folder, {"a": "s1.safetensors", "b": "s2.safetensors"})
    _refused(folder, "links to .* outside")
    (folder / "model.safetensors.index.json").unlink()
    _refused(folder, "links to .* outside")  # the folder's own listing is checked too


def test_hub_cache_symlinks_into_blobs_are_allowed(tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    save_file({"a": torch.ones(2)}, str(repo / "blobs" / "f00d"))
    (snap / "model.safetensors").symlink_to("../../blobs/f00d")
    ck = Checkpoint.open(snap)
    assert list(ck.tensors) == ["a"]


def test_tensors_missing_from_the_index_are_reported(tmp_path):
    folder = _folder(tmp_path)
    _index(folder, {"a": "s1.safetensors"})
    save_file({"b": torch.zeros(3), "c": torch.ones(1)}, str(folder / "s2.safetensors"))
    _index(folder, {"a": "s1.safetensors", "b": "s2.safetensors"})
    _refused(folder, r"does not list 1 tensor\(s\) that its shards hold \(e.g. c\)")


@pytest.mark.parametrize("doc", [[{"weight_map": {}}], {"weight_map": {"a": 1}}, {"weight_map": ["a"]}, {"x": 1}])
def test_malformed_index_is_one_line(tmp_path, doc):
    folder = _folder(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(doc))
    _refused(folder, "not a valid index file")


def _opens_without_blocking(target, match):
    result = []

    def run():
        try:
            Checkpoint.open(target)
        except CheckpointError as exc:
            result.append(str(exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "opening blocked on a FIFO"
    assert result and match in result[0], result


def test_fifo_named_like_weights_never_blocks(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    _opens_without_blocking(folder, "not a regular file")
    _opens_without_blocking(folder / "model.safetensors", "not a regular file")
    bins = tmp_path / "bins"
    bins.mkdir()
    os.mkfifo(bins / "pytorch_model.bin")
    _opens_without_blocking(bins, "not a regular file")


def test_bin_with_int_keys_is_refused(tmp_path):
    torch.save({1: torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    _refused(tmp_path / "pytorch_model.bin", "under the key 1 .int.")


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_unsafe_bin_refusal_says_code_execution(tmp_path):
    torch.save({"a": _Evil()}, tmp_path / "pytorch_model.bin")
    msg = _refused(tmp_path / "pytorch_model.bin", "would need code execution")
    assert "system" in msg and "weights_only" not in msg


def test_legacy_bin_is_read(tmp_path):
    torch.save({"w": torch.arange(4.0)}, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ck = Checkpoint.open(tmp_path)
    assert ck.tensors["w"].shape == (4,) and ck.tensors["w"].dtype == "F32"


def test_corrupt_legacy_bin_is_named_as_such(tmp_path):
    torch.save({"w": torch.arange(64.0)}, tmp_path / "full.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "pytorch_model.bin").write_bytes((tmp_path / "full.bin").read_bytes()[:300])
    _refused(tmp_path / "pytorch_model.bin", r"legacy \(pre-1.6\) PyTorch file")


def test_hub_download_fetches_one_format():
    both = ["config.json", "model.safetensors", "pytorch_model.bin", "README.md"]
    assert weight_patterns(both) == ["*.safetensors", "*.safetensors.index.json", "config.json"]
    sharded = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model-00001.bin"]
    assert "*.bin" not in weight_patterns(sharded)
    assert weight_patterns(["config.json", "pytorch_model.bin"]) == ["*.bin", "*.bin.index.json", "config.json"]


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root, and no setpriv to drop its rights")
def test_unreadable_folder_is_one_line(tmp_path):
    folder = _folder(tmp_path)
    other = _folder(tmp_path, "other")
    folder.chmod(0)
    code = ("import sys; from rlsparse.cli.main import main; "
            f"sys.exit(main(['diff', {str(folder)!r}, {str(other)!r}, '--quiet']))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # root reads any folder: drop the capabilities that let it
    prefix = (["setpriv", "--inh-caps=-dac_override,-dac_read_search",
               "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else [])
    proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    folder.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert "folder is not readable" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
