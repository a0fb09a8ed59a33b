"""Cells in worker processes (``lab.parallel``): the same bytes and numbers as one process with one
thread, resume that reruns nothing, a failing cell as one line; and the probe KL with the base's
side computed once, bit for bit the KL computed from both models."""

import hashlib
import json
import sys
from pathlib import Path

import pytest

from rlsparse.lab import measure, runner

sys.path.insert(0, str(Path(__file__).parent))
from _recipes import write_recipe  # noqa: E402

# Wall-clock fields: they differ between any two runs (as in test_lab_resume).
_TIMES = {"seconds", "eval_seconds", "eval_load_seconds", "cell_seconds", "step_cost", "phase_seconds"}


def _recipes(tmp_path):
    return [
        write_recipe(tmp_path, "p_sft", algorithm="sft", family="sub", data="ground_truth"),
        write_recipe(tmp_path, "p_dpo", algorithm="dpo", family="sub", data="constructed_pairs", conjecture=True,
                     trl={"beta": 0.1}, learning_rates=[1e-2]),
    ]


def _opts(base, out, **kw):
    return runner.LabOptions(out=out, model=str(base), report=False, progress="none", **kw)


def _weights(out: Path) -> dict[str, str]:
    """sha256 of every checkpoint the run saved, by folder."""
    return {str(f.parent.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(out.rglob("model.safetensors"))}


def _measured(results: dict) -> dict:
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in _TIMES}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip({k: results[k] for k in ("recipes", "conjecture", "controls")})


@pytest.fixture(scope="module")
def two_runs(tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    recipes = _recipes(tmp)
    one, two = tmp / "one", tmp / "two"
    runner.run_lab(recipes, _opts(tiny_base, one, threads=1, jobs=1), log=lambda m: None)
    lines: list[str] = []
    runner.run_lab(recipes, _opts(tiny_base, two, threads=2, jobs=2), log=lines.append)
    return recipes, one, two, lines


def test_two_workers_give_the_same_checkpoints_and_numbers_as_one_process(two_runs):
    _, one, two, lines = two_runs
    weights = _weights(one)
    # 3 sweep cells, the Conjecture 1 rerun and both of its controls
    assert set(weights) == {"runs/p_sft/lr-1e-3", "runs/p_sft/lr-1e-2", "runs/p_dpo/lr-1e-2", "conjecture/p_dpo/sub",
                            "conjecture/p_dpo/random", "conjecture/p_dpo/reseeded"}
    assert _weights(two) == weights
    first = json.loads((one / "results.json").read_text())
    second = json.loads((two / "results.json").read_text())
    assert _measured(second) == _measured(first)
    assert "skipped" not in second["conjecture"]["p_dpo"] and second["conjecture"]["p_dpo"]["changed_outside_mask"] == 0
    run_one, run_two = (json.loads((o / "run.json").read_text()) for o in (one, two))
    assert (run_one["jobs"], run_one["threads"], run_one["worker_threads"]) == (1, 1, None)
    assert (run_two["jobs"], run_two["threads"], run_two["worker_threads"]) == (2, 2, 1)
    # base accuracy, 3 cells, 3 Conjecture 1 trainings: each reported once as it finished, with an ETA
    pool = lines[:lines.index("assembling the results from the finished cells")]
    assert pool[1] == "running 7 tasks on 2 worker processes, 1 torch thread each"
    done = [line for line in pool if line.startswith("[") and "ETA" in line]
    assert len(done) == 7 and done[-1].startswith("[7/7] ")
    assert sorted(line.split("] ", 1)[1].split(":")[0] for line in done) == sorted(
        ["base accuracy", "p_sft lr=0.001 seed 1", "p_sft lr=0.01 seed 1", "p_dpo lr=0.01 seed 1",
         "conjecture 1 sub on p_dpo", "conjecture 1 random on p_dpo", "conjecture 1 reseeded on p_dpo"])
    # the parent then reads the 3 cells back (it measures Conjecture 1 itself); none is said to be from an earlier session
    read_back = lines[lines.index("assembling the results from the finished cells"):]
    assert sum(line.endswith(": on disk, read back") for line in read_back) == 3
    assert not any("finished earlier" in line for line in lines)


def test_resuming_a_parallel_run_reruns_nothing(two_runs, tiny_base, monkeypatch):
    recipes, _, two, _ = two_runs
    before = json.loads((two / "results.json").read_text())
    weights = _weights(two)
    trained, evaluated = [], []
    real_train, real_eval = runner.train_checkpoints, runner.evaluate_checkpoint
    monkeypatch.setattr(runner, "train_checkpoints", lambda *a, **k: trained.append(a[2]) or real_train(*a, **k))
    monkeypatch.setattr(runner, "evaluate_checkpoint", lambda *a, **k: evaluated.append(a[2]) or real_eval(*a, **k))
    lines: list[str] = []
    runner.run_lab(recipes, _opts(tiny_base, two, threads=2, jobs=2), log=lines.append, resume=True)
    assert trained == [] and evaluated == []
    assert not any("worker processes" in line for line in lines)  # nothing left to plan: no pool at all
    assert sum(line.endswith(": finished earlier, kept (resume)") for line in lines) == 4
    assert _weights(two) == weights
    assert _measured(json.loads((two / "results.json").read_text())) == _measured(before)


def test_a_failing_cell_stops_the_run_with_one_line_naming_it(tiny_base, tmp_path, capsys):
    from rlsparse.cli.main import main

    good = write_recipe(tmp_path, "f_sft", algorithm="sft", family="add", data="ground_truth", learning_rates=[1e-2])
    # a TRL field the trainer's config does not have: found only when the worker builds the trainer
    bad = write_recipe(tmp_path, "f_bad", algorithm="sft", family="add", data="ground_truth", learning_rates=[1e-2],
                       trl={"no_such_field": 1})
    out = tmp_path / "run"
    code = main(["lab", "run", f"{good},{bad}", "--out", str(out), "--model", str(tiny_base), "--jobs", "2",
                 "--no-conjecture", "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("rlsparse lab: error: f_bad lr=0.01 seed 1: recipe f_bad: trl fields "
                                               "['no_such_field'] are not SFTConfig fields")
    assert (out / "runs/f_sft/lr-1e-2/metrics.json").is_file()  # the cell that finished stays
    assert not (out / "runs/f_bad/lr-1e-2").exists() and not (out / "results.json").exists()


def _probe_kl_reference(base_model, finetuned_model, tokenizer, pairs):
    """probe_kl as it was before the base's side was cached: both models' logits batch by batch."""
    import torch

    total, count = 0.0, 0
    for (lb, _, mask), (lf, _, _) in zip(measure.completion_token_logprobs(base_model, tokenizer, pairs),
                                         measure.completion_token_logprobs(finetuned_model, tokenizer, pairs)):
        pb, pf = torch.log_softmax(lb[mask], -1), torch.log_softmax(lf[mask], -1)
        total += float((pb.exp() * (pb - pf)).sum(-1).double().sum())
        count += int(mask.sum())
    return total / count


def test_probe_kl_from_cached_base_logprobs_is_bit_identical(tiny_base):
    import torch

    from rlsparse.lab.base import load_model
    from rlsparse.lab.tasks import split

    base, tok = load_model(tiny_base, "cpu")
    tuned, _ = load_model(tiny_base, "cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    pairs = [(p.prompt, p.answer) for p in split("add", seed=0, n_test=150)[1]]  # 3 batches of <= 64
    cached = measure.probe_logprobs(base, tok, pairs)
    assert len(cached) == 3
    reference = _probe_kl_reference(base, tuned, tok, pairs)
    assert reference > 0
    assert measure.probe_kl(None, tuned, tok, pairs, base_logprobs=cached) == reference
    assert measure.probe_kl(base, tuned, tok, pairs) == reference
    # reused for a second finetune: the cached tensors are not consumed or changed by the first use
    assert measure.probe_kl(None, tuned, tok, pairs, base_logprobs=cached) == reference


def test_auto_jobs_take_no_more_workers_than_the_available_memory_holds(monkeypatch):
    import os

    from rlsparse.lab import parallel

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    per_worker = 1_000_000 * parallel.WORKER_BYTES_PER_PARAMETER
    for available, want in ((10 * per_worker, 4), (3 * per_worker - 1, 2), (per_worker // 2, 1), (None, 4)):
        monkeypatch.setattr(parallel, "available_memory", lambda: available)
        assert parallel.resolve_jobs("auto", "cpu", runnable=20, parameters=1_000_000) == want
    monkeypatch.setattr(parallel, "available_memory", lambda: per_worker)
    assert parallel.resolve_jobs("auto", "cpu", runnable=20, parameters=None) == 4  # size unknown: cores decide
    assert parallel.resolve_jobs(3, "cpu", runnable=20, parameters=1_000_000) == 3  # a number is taken as given
    assert parallel.resolve_jobs("auto", "cuda", runnable=20, parameters=1_000_000) == 1


def test_available_memory_reads_the_kernels_estimate():
    from rlsparse.lab import parallel

    got = parallel.available_memory()
    if Path("/proc/meminfo").is_file():
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        assert abs(got - int(line.split()[1]) * 1024) < 1 << 30  # read moments apart
    else:
        assert got is None


def test_the_run_says_when_memory_chose_fewer_workers_than_cores(monkeypatch, tiny_base):
    import os
    from types import SimpleNamespace

    from rlsparse.io.checkpoint import Checkpoint
    from rlsparse.lab import parallel

    params = sum(t.numel for t in Checkpoint.open(tiny_base).tensors.values())
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(parallel, "available_memory", lambda: 2 * params * parallel.WORKER_BYTES_PER_PARAMETER)
    lines = []
    assert runner._resolve_jobs("auto", "cpu", 10, SimpleNamespace(base_path=tiny_base), lines.append) == 2
    assert len(lines) == 1 and lines[0].startswith("--jobs auto: 2 workers, as many as")
    lines.clear()
    monkeypatch.setattr(parallel, "available_memory", lambda: 100 * params * parallel.WORKER_BYTES_PER_PARAMETER)
    assert runner._resolve_jobs("auto", "cpu", 10, SimpleNamespace(base_path=tiny_base), lines.append) == 4
    assert lines == []  # the cores (at most 4) decided, not memory
