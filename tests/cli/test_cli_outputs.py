"""Outputs never overwrite inputs or each other; options are checked before work; the outputs of
one command appear together or not at all."""

from __future__ import annotations

import hashlib

import pytest

from rlsparse.cli.main import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _one_line(err: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_json_onto_an_input_file_is_refused(tiny_pair, capsys):
    base, ft = tiny_pair
    before = _digest(base)
    shard = sorted(base.glob("model-*.safetensors"))[0]
    code, _, err = _run(capsys, "diff", base, ft, "--json", shard, "--quiet")
    assert code == 2 and f"--json {shard} would overwrite or add weights inside the input checkpoint {base}" in err
    _one_line(err)
    assert _digest(base) == before


def test_mask_onto_an_input_file_given_as_file_is_refused(tiny_pair, tmp_path, capsys):
    base, ft = tiny_pair
    from tinymodels import save, tiny_llama

    single = save(tiny_llama(), tmp_path / "single", shard=None) / "model.safetensors"
    before = single.read_bytes()
    code, _, err = _run(capsys, "diff", single, single.parent, "--save-mask", single, "--quiet")
    assert code == 2 and f"--save-mask {single} is the input {single}" in err, err
    _one_line(err)
    assert single.read_bytes() == before


def test_two_outputs_on_one_path_are_refused(tiny_pair, tmp_path, capsys):
    base, ft = tiny_pair
    out = tmp_path / "x"
    code, _, err = _run(capsys, "diff", base, ft, "--json", out, "--save-mask", out, "--quiet")
    assert code == 2 and "both write" in err, err
    _one_line(err)
    assert not out.exists()


def test_overlap_json_onto_an_input_mask_is_refused(tiny_pair, tmp_path, capsys):
    base, ft = tiny_pair
    a, b = tmp_path / "a.mask", tmp_path / "b.mask"
    assert _run(capsys, "diff", base, ft, "--save-mask", a, "--quiet")[0] == 0
    assert _run(capsys, "diff", base, ft, "--save-mask", b, "--mask-tolerance", "0", "--quiet")[0] == 0
    before = a.read_bytes()
    code, _, err = _run(capsys, "overlap", a, b, "--json", a, "--quiet")
    assert code == 2 and "is the input" in err, err
    _one_line(err)
    assert a.read_bytes() == before


def test_same_input_twice_is_refused(tiny_pair, capsys):
    base, _ = tiny_pair
    code, _, err = _run(capsys, "diff", base, f"{base}/.", "--quiet")
    assert code == 2 and "the same checkpoint" in err, err
    _one_line(err)


def test_bad_plot_tolerance_is_refused_before_work(tiny_pair, tmp_path, capsys):
    base, ft = tiny_pair
    code, _, err = _run(capsys, "diff", base, ft, "--save-mask", tmp_path / "m", "--plot", tmp_path / "p.png",
                        "--plot-tolerance", "1e-3", "--quiet")
    assert code == 2 and "--plot-tolerance" in err, err
    _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]


def test_late_interrupt_keeps_no_output(tiny_pair, tmp_path, capsys, monkeypatch):
    import rlsparse.io.atomic as atomic

    base, ft = tiny_pair

    def interrupted(path, doc):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "write_json", interrupted)
    code, _, err = _run(capsys, "diff", base, ft, "--save-mask", tmp_path / "m", "--json", tmp_path / "r.json",
                        "--quiet")
    assert code == 130 and "no output was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]


def test_all_outputs_appear_together(tiny_pair, tmp_path, capsys):
    base, ft = tiny_pair
    code, out, err = _run(capsys, "diff", base, ft, "--save-mask", tmp_path / "m", "--json", tmp_path / "r.json",
                          "--plot", tmp_path / "p.png")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "m", "p.png", "r.json"]
    import json

    assert json.loads((tmp_path / "r.json").read_text())["options"]["mask_path"] == str(tmp_path / "m")


def test_early_interrupt_is_one_line(capsys, monkeypatch):
    import rlsparse.cli.main as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "make_parser", interrupted)
    code = cli.main(["diff", "a", "b"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and err.count("\n") == 1


def test_entry_point_import_is_light():
    # the console script imports rlsparse.cli.main before main() can catch Ctrl-C: keep it tiny
    import subprocess
    import sys

    code = "import sys, rlsparse.cli.main; print(sorted(m for m in ('numpy', 'torch', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": ":".join(sys.path)}).stdout
    assert out.strip() == "[]"


def test_a_report_beside_the_weights_is_allowed(tiny_pair, capsys):
    base, ft = tiny_pair
    for _ in range(2):  # twice: the existing report is not an input
        code, _, err = _run(capsys, "diff", base, ft, "--json", ft / "diff.json", "--quiet")
        assert code == 0, err
    code, _, err = _run(capsys, "diff", base, ft, "--json", ft / "config.json", "--quiet")
    assert code == 2 and "inside the input checkpoint" in err


def test_signal_handlers_are_restored_after_main(capsys):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    main(["diff", "nope-a", "nope-b"])
    capsys.readouterr()
    assert signal.getsignal(signal.SIGTERM) is before
