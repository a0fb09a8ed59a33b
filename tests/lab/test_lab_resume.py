"""Resume after an interruption between a cell's checkpoint and its measurements: the checkpoint is
measured, not trained again, when its trained.json proves it is this cell's; otherwise it is retrained."""

import json

import pytest

from rlsparse.lab import runner
from rlsparse.lab import trained as trained_record

# Wall-clock fields: they differ between any two runs.
_TIMES = {"seconds", "eval_seconds", "eval_load_seconds", "cell_seconds", "step_cost", "phase_seconds"}


def _recipe(tmp_path, **fields):
    data = {"name": "r_sft", "algorithm": "sft", "family": "add", "data": "ground_truth", "learning_rates": [1e-2],
            "steps": 2, "batch_size": 8, "n_train": 32, "seed": 1, **fields}
    path = tmp_path / "r_sft.json"
    path.write_text(json.dumps(data))
    return str(path)


def _opts(base, out):
    return runner.LabOptions(out=out, model=str(base), conjecture=False, report=False, progress="none")


def _counting(monkeypatch):
    calls = []
    real = runner.train_checkpoints

    def counted(*args, **kwargs):
        calls.append(args[2])  # the learning rate
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_checkpoints", counted)
    return calls


def _interrupt_measurement_once(monkeypatch):
    real = runner._measure_point
    state = {"raised": False}

    def measure_or_stop(*args, **kwargs):
        if not state["raised"]:
            state["raised"] = True
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_measure_point", measure_or_stop)


def _without_times(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in _TIMES}


def _tamper_weights(cell):
    data = bytearray((cell / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight: still a loadable checkpoint, not the one trained
    (cell / "model.safetensors").write_bytes(bytes(data))


def _record_of_another_cell(cell):
    record = json.loads((cell / "trained.json").read_text())
    record["cell"]["learning_rate"] = 1e-3
    (cell / "trained.json").write_text(json.dumps(record))


@pytest.mark.parametrize("damage, trainings", [
    (None, 1),  # checkpoint and record intact: measured on resume, never trained again
    (_tamper_weights, 2),  # the weights changed after the record: not provably this cell's
    (_record_of_another_cell, 2),  # the record names another learning rate
    (lambda cell: (cell / "trained.json").unlink(), 2),  # stopped between the checkpoint and its record
])
def test_resume_measures_the_saved_checkpoint_only_when_it_is_this_cells(tiny_base, tmp_path, monkeypatch,
                                                                        damage, trainings):
    recipe = _recipe(tmp_path)
    # The reference: the same cell, never interrupted.
    runner.run_lab([recipe], _opts(tiny_base, tmp_path / "whole"), log=lambda m: None)
    whole = json.loads((tmp_path / "whole/runs/r_sft/lr-1e-2/metrics.json").read_text())

    calls = _counting(monkeypatch)
    _interrupt_measurement_once(monkeypatch)
    out = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="interrupted"):
        runner.run_lab([recipe], _opts(tiny_base, out), log=lambda m: None)
    cell = out / "runs/r_sft/lr-1e-2"
    assert (cell / "config.json").is_file() and (cell / "trained.json").is_file()
    assert not (cell / "metrics.json").exists() and calls == [1e-2]
    if damage is not None:
        damage(cell)

    runner.run_lab([recipe], _opts(tiny_base, out), log=lambda m: None, resume=True)
    assert len(calls) == trainings
    resumed = json.loads((cell / "metrics.json").read_text())
    # Training is deterministic here, so measuring the kept checkpoint gives the uninterrupted run's numbers.
    assert _without_times(resumed) == _without_times(whole)
    assert trained_record.checkpoint_sha256(cell) == trained_record.checkpoint_sha256(tmp_path / "whole/runs/r_sft/lr-1e-2")
    assert trained_record.load(cell, json.loads((cell / "trained.json").read_text())["cell"]) is not None


def test_a_record_is_refused_for_a_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    trained_record.save(tmp_path, {"x": 1}, {"log_history": []})
    assert trained_record.load(tmp_path, {"x": 1}) is None  # no weight files: nothing to measure
