"""What `series` and `overlap` make of their inputs: step order, folders without a model, a model
folder where a mask is expected."""

from __future__ import annotations

import json

import pytest

from _build import base_model, bump, random_choice, write
from rlsparse.analysis.series import expand_checkpoints, series
from rlsparse.cli.main import main
from rlsparse.errors import CheckpointError, UsageError


@pytest.fixture
def run(tmp_path):
    base, sd = base_model(tmp_path)
    s1 = bump(sd, random_choice(sd, 0.2, seed=1))
    s2 = bump(s1, random_choice(sd, 0.1, seed=2), amount=0.5)
    out = tmp_path / "run"
    out.mkdir()
    write(s1, base, out / "checkpoint-2")
    write(s2, base, out / "checkpoint-10")
    return base, out


def test_checkpoints_out_of_step_order_are_sorted_and_the_final_named(run):
    base, out = run
    notes = []
    got = expand_checkpoints([out / "checkpoint-10", out / "checkpoint-2"], notes=notes)
    assert got == [str(out / "checkpoint-2"), str(out / "checkpoint-10")]
    assert len(notes) == 1 and "sorted by step" in notes[0] and notes[0].endswith(f"final one is {out / 'checkpoint-10'}")
    assert expand_checkpoints([out / "checkpoint-2", out / "checkpoint-10"], notes=notes) == got and len(notes) == 1
    in_order = series(base, got)
    assert in_order.steps == [2, 10]


def test_series_cli_sorts_and_says_so(run, tmp_path, capsys):
    base, out = run
    doc = tmp_path / "s.json"
    assert main(["series", str(base), str(out / "checkpoint-10"), str(out / "checkpoint-2"), "--json", str(doc)]) == 0
    captured = capsys.readouterr()
    assert "out of step order" in captured.err
    assert "final checkpoint:" in captured.out
    assert [c["step"] for c in json.loads(doc.read_text())["checkpoints"]] == [2, 10]


def test_out_of_order_beside_a_stepless_checkpoint_is_refused(run, tmp_path):
    base, out = run
    with pytest.raises(UsageError, match="not in step order"):
        expand_checkpoints([out / "checkpoint-10", base, out / "checkpoint-2"])


def test_folder_without_a_model_is_named(run, tmp_path, capsys):
    base, out = run
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no model weights"):
        expand_checkpoints([empty])
    assert main(["series", str(base), str(empty)]) == 2
    err = capsys.readouterr().err
    assert "holds no model weights" in err and "got 1" not in err


def test_overlap_given_a_model_folder_says_so(run, tmp_path, capsys):
    base, out = run
    assert main(["overlap", str(out / "checkpoint-2"), str(out / "checkpoint-10")]) == 2
    err = capsys.readouterr().err
    assert "is a folder (a model checkpoint)" in err and "--from-checkpoints" in err and "no such mask" not in err


def test_series_cli_on_a_training_folder_with_final_weights(run, tmp_path, capsys):
    base, out = run
    import shutil

    for f in (out / "checkpoint-10").iterdir():  # the trainer's final save beside its checkpoints
        shutil.copy(f, out / f.name)
    doc = tmp_path / "s.json"
    assert main(["series", str(base), str(out), "--json", str(doc)]) == 0, capsys.readouterr().err
    got = [(c["path"], c["step"]) for c in json.loads(doc.read_text())["checkpoints"]]
    assert got == [(str(out / "checkpoint-2"), 2), (str(out / "checkpoint-10"), 10), (str(out), None)]
