"""`rlsparse diff` on the command line: outputs, and one clear line for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tinymodels import save, tiny_llama
from rlsparse.cli.main import main
from rlsparse.masks import Mask


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_outputs_json_plot_mask(tiny_pair, tmp_path, capsys):
    base, ft = tiny_pair
    code, out, err = _run(capsys, "diff", str(base), str(ft), "--json", str(tmp_path / "r.json"),
                          "--plot", str(tmp_path / "h.png"), "--save-mask", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    assert "Update sparsity by tolerance" in out and "1e-05" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert set(doc["total"]["changed"]) == {"0", "1e-08", "1e-07", "1e-06", "1e-05"}
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Mask.load(tmp_path / "m.safetensors").ones == doc["total"]["changed"]["1e-05"]


def test_one_canonical_tolerance_key_in_cli_and_api(tiny_pair, tmp_path, capsys):
    import rlsparse

    base, ft = tiny_pair
    code, _, err = _run(capsys, "diff", str(base), str(ft), "--tolerances", "0,1e-5,0.001", "--quiet",
                        "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert list(doc["total"]["changed"]) == ["0", "1e-05", "0.001"]
    r = rlsparse.diff(base, ft, tolerances=[0, 1e-5, 1e-3])
    assert r.labels == ["0", "1e-05", "0.001"]
    assert r.total.sparsity(1e-5) == r.total.sparsity("1e-5") == r.total.sparsity("1e-05") == \
        doc["total"]["sparsity"]["1e-05"]
    assert r.tensors["lm_head.weight"].changed[1e-3] == r.tensors["lm_head.weight"].changed["0.001"]
    with pytest.raises(KeyError, match="not a measured tolerance"):
        r.total.sparsity(1e-6)


def _bad_inputs(tmp_path):
    good = save(tiny_llama(), tmp_path / "good")
    other = tiny_llama(vocab=80)
    save(other, tmp_path / "resized")
    data = (good / sorted(p.name for p in good.glob("model-*.safetensors"))[0]).read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:100])
    (tmp_path / "notckpt").mkdir()
    (tmp_path / "notckpt" / "readme.txt").write_text("hi")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "ro").mkdir()
    return {
        "missing path": ([str(tmp_path / "nope"), str(good)], "no such file"),
        "not a checkpoint": ([str(tmp_path / "notckpt"), str(good)], "holds no model.safetensors"),
        "truncated": ([str(good), str(tmp_path / "trunc.safetensors")], "truncated"),
        "tensor sets differ": ([str(good), str(tmp_path / "x.safetensors")], "tensor sets differ"),
        "shape mismatch": ([str(good), str(tmp_path / "resized")], "--allow-resize"),
        "bad tolerance": ([str(good), str(good), "--tolerances", "abc"], "not a number"),
        "bad dtype": ([str(good), str(good), "--compare-dtype", "int3"], "not a float dtype"),
        "unwritable output": ([str(good), str(good), "--json", str(tmp_path / "no" / "r.json")], "does not exist"),
    }


def test_bad_inputs_give_one_line_and_no_output(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    capsys.readouterr()
    for case, (argv, expect) in cases.items():
        out_mask = tmp_path / f"{case.replace(' ', '_')}.mask"
        code, out, err = _run(capsys, "diff", *argv, "--save-mask", str(out_mask))
        assert code == 2, case
        lines = err.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0] and lines[0].startswith("rlsparse diff: error:"), (case, err)
        assert not out_mask.exists(), case
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], case  # no temp files left


def test_console_script_exit_code_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "rlsparse", "diff", str(tmp_path / "a"), str(tmp_path / "b")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("flag", ["--allow-missing", "--allow-resize"])
def test_allow_flags_proceed(tmp_path, capsys, flag):
    cases = _bad_inputs(tmp_path)
    argv = cases["tensor sets differ" if flag == "--allow-missing" else "shape mismatch"][0]
    code, out, err = _run(capsys, "diff", *argv, flag, "--allow-missing")
    assert code == 0, err
