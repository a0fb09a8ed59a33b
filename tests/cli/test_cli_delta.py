"""`rlsparse delta pack | apply | inspect` end to end through the CLI entry point."""

from __future__ import annotations

import json

import torch

from rlsparse.cli.main import main
from tinymodels import state


def test_pack_inspect_apply(tmp_path, tiny_pair, capsys):
    base, ft = tiny_pair
    patch = tmp_path / "p.rlpatch"
    assert main(["delta", "pack", str(base), str(ft), "-o", str(patch)]) == 0
    assert "smaller than" in capsys.readouterr().out
    assert main(["delta", "inspect", str(patch), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    a, b = state(base), state(ft)
    brute = sum(int((a[n].view(torch.int16) != b[n].view(torch.int16)).sum()) for n in a)
    assert doc["schema_version"] == 1 and doc["total"]["changed"] == brute
    assert main(["delta", "inspect", str(patch)]) == 0
    assert "changed" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["delta", "apply", str(base), str(patch), "-o", str(out), "--max-shard-size", "30KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    c = state(out)
    assert sorted(c) == sorted(b) and all(torch.equal(c[n].view(torch.int16), b[n].view(torch.int16)) for n in b)


def test_usage_errors_are_one_line(tmp_path, tiny_pair, capsys):
    base, ft = tiny_pair
    assert main(["delta", "pack", str(base), str(ft), "-o", str(tmp_path / "p"), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    main(["delta", "pack", str(base), str(ft), "-o", str(tmp_path / "p"), "--quiet"])
    assert main(["delta", "apply", str(base), str(tmp_path / "p"), "-o", str(tmp_path / "o"),
                 "--max-shard-size", "lots"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-shard-size" in err
    assert not (tmp_path / "o").exists()
