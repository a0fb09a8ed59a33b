"""--progress: a bar on a terminal, plain lines (done/total, rate, ETA) elsewhere, for diff,
the analyses, training and the lab; and what `rlsparse train` prints around training."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rlsparse.cli.main import main
from rlsparse.report import progress as progress_mod
from rlsparse.report.progress import Ticker, progress_bar, resolve_mode


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere():
    assert resolve_mode("auto", _Tty()) == "bar"
    assert resolve_mode("auto", io.StringIO()) == "lines"
    assert resolve_mode(True, io.StringIO()) == "lines" and resolve_mode(False) == "none"
    assert resolve_mode("bar", io.StringIO()) == "bar"


def test_ticker_prints_done_total_rate_and_eta_every_interval():
    clock, out = _Clock(), []
    t = Ticker(4_000_000_000, "diff", unit="bytes", interval=10, write=out.append, clock=clock)
    clock.t = 5
    t.update(1_000_000_000)
    assert out == []  # not yet 10 s since the start
    clock.t = 10
    t.update(1_000_000_000)
    assert out == ["diff: 2.00 GB/4.00 GB (50%), 200.00 MB/s, ETA 10 s"]
    clock.t = 15
    t.update(1_000_000_000)
    assert len(out) == 1
    clock.t = 20
    t.update(1_000_000_000)
    t.finish()
    assert out[1:] == ["diff: 4.00 GB/4.00 GB (100%), 200.00 MB/s, ETA 0 s", "diff: 4.00 GB in 20 s"]


def test_ticker_counts_steps_with_units_and_long_etas():
    clock, out = _Clock(), []
    t = Ticker(10_000, "grpo", unit="steps", interval=10, write=out.append, clock=clock)
    clock.t = 30
    t.set(100)
    assert out == ["grpo: 100/10,000 steps (1%), 3 steps/s, ETA 49 min 30 s"]


def test_lines_mode_writes_plain_lines(capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "LINE_INTERVAL_S", 0.0)
    with progress_bar(300, "overlap", unit="elements", enabled="lines") as advance:
        advance(100)
        advance(200)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("overlap: 100/300 elements (33%), ") and "ETA" in err[0]
    assert err[1].startswith("overlap: 300/300 elements (100%), ")
    assert err[2].startswith("overlap: 300 elements in ")


def test_diff_progress_lines_when_not_on_a_terminal(tiny_pair, capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "LINE_INTERVAL_S", 0.0)
    base, ft = tiny_pair
    assert main(["diff", str(base), str(ft), "--progress", "auto", "--no-layers"]) == 0
    err = capsys.readouterr().err
    assert "diff: " in err and "/s, ETA" in err and "(100%)" in err
    assert main(["diff", str(base), str(ft), "--progress", "none", "--no-layers"]) == 0
    assert capsys.readouterr().err == ""


def test_bad_progress_mode_is_refused(tiny_pair, capsys):
    base, ft = tiny_pair
    with pytest.raises(SystemExit):
        main(["diff", str(base), str(ft), "--progress", "sometimes"])
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err


@pytest.fixture
def train_base(tmp_path):
    pytest.importorskip("trl")
    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from trainhelpers import make_model, make_tokenizer, random_mask

    model, tok = make_model(), make_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    mask = random_mask(model)
    mask.save(tmp_path / "sub.mask.safetensors")
    rows = [{"prompt": "w1 w2", "completion": " w3 w4"}, {"prompt": "w5", "completion": " w6"}] * 2
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    frozen = sum(t.numel() - int(t.sum()) for t in (mask.get(n) for n in mask.names))
    return tmp_path, frozen


TRAIN = ["--max_steps", "3", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
         "--use_cpu", "--learning_rate", "1e-2"]


def test_train_prints_progress_lines_and_what_verify_checked(train_base, capsys, monkeypatch):
    tmp, frozen = train_base
    monkeypatch.setattr(progress_mod, "LINE_INTERVAL_S", 0.0)
    code = main(["train", "sft", "--model", str(tmp / "base"), "--dataset", str(tmp / "data.jsonl"), "--mask",
                 str(tmp / "sub.mask.safetensors"), "--verify", "--output_dir", str(tmp / "out"),
                 "--progress", "lines", *TRAIN])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"verified: {frozen:,} masked-out parameters bit-identical" in out
    assert "sft: 1/3 steps (33%), " in err and "sft: 3/3 steps (100%), " in err and "sft: 3 steps in " in err


def test_train_shows_no_renamed_option_future_warnings(train_base):
    tmp, _ = train_base
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-m", "rlsparse", "train", "sft", "--model", str(tmp / "base"), "--dataset",
                           str(tmp / "data.jsonl"), "--output_dir", str(tmp / "out"), "--progress", "none", *TRAIN],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "FutureWarning" not in proc.stderr and "deprecated and will be removed in v6" not in proc.stderr


def test_only_the_renamed_option_warnings_are_hidden():
    pytest.importorskip("trl")
    from rlsparse.train.trainers import quiet_renamed_option_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_renamed_option_warnings()
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6. Use "
                      "`activation_checkpointing` instead.", FutureWarning)
        warnings.warn("`foo` will change its default in v6", FutureWarning)
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6. Use "
                      "`activation_checkpointing` instead.", DeprecationWarning)
    assert [(type(w.message), str(w.message)[:5]) for w in seen] == [(FutureWarning, "`foo`"),
                                                                     (DeprecationWarning, "`grad")]


def test_ticker_shows_seconds_per_step_when_steps_are_slow():
    clock, out = _Clock(), []
    t = Ticker(20, "sft", unit="steps", interval=10, write=out.append, clock=clock)
    clock.t = 95
    t.set(10)
    assert out == ["sft: 10/20 steps (50%), 9.5 s/step, ETA 1 min 35 s"]
