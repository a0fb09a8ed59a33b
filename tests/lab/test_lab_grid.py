"""The learning-rate x steps grid on the tiny base: checkpoints along one run per learning rate,
measured like sweep cells, the Pareto frontier, matched readings, the report section and resume."""

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from rlsparse.errors import UsageError
from rlsparse.lab import runner
from rlsparse.lab import trained as trained_record
from rlsparse.lab.verdicts.grid import pareto_frontier, read_at

LRS, STEPS = [1e-3, 1e-2], [1, 2]


def _recipe(tmp_path, name, **fields):
    data = {"name": name, "learning_rates": [1e-2], "steps": 2, "batch_size": 8, "n_train": 32, "seed": 1,
            "grid": {"learning_rates": LRS, "checkpoints": STEPS},
            # a constant schedule: the step-1 checkpoint of a 2-step run is a 1-step run's
            "trl": {"lr_scheduler_type": "constant", "warmup_steps": 0, **fields.pop("trl", {})}, **fields}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def _opts(base, out, **kw):
    return runner.LabOptions(out=out, model=str(base), progress="none", **kw)


def _changed(base, ckpt, tol: float) -> int:
    """Brute force: elements whose stored values, widened to fp32, differ by more than tol."""
    a, b = load_file(str(base / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    return sum(int(((b[n].float() - a[n].float()).abs() > tol).sum()) for n in a)


def _brute_frontier(points):
    """Every point for which no other point is as good in both and better in one (pairwise check)."""
    out = []
    for i, p in enumerate(points):
        beaten = False
        for j, q in enumerate(points):
            if i != j and q["sparsity"] >= p["sparsity"] and q["gain"] >= p["gain"] and \
                    (q["sparsity"] != p["sparsity"] or q["gain"] != p["gain"]):
                beaten = True
        if not beaten:
            out.append(p)
    return out


@pytest.fixture(scope="module")
def grid_run(tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    recipes = [_recipe(tmp, "g_sft", algorithm="sft", family="sub", data="ground_truth"),
               _recipe(tmp, "g_dpo", algorithm="dpo", family="sub", data="constructed_pairs", in_distribution=True,
                       trl={"beta": 0.1})]
    out = tmp / "run"
    runner.run_lab(recipes, _opts(tiny_base, out, grid=True), log=lambda m: None)
    return tmp, recipes, out


def test_grid_checkpoints_are_measured_like_cells(grid_run, tiny_base):
    tmp, recipes, out = grid_run
    results = json.loads((out / "results.json").read_text())
    assert results["recipes"] == {} and set(results["grid"]) == {"g_sft", "g_dpo"}
    for name in ("g_sft", "g_dpo"):
        points = results["grid"][name]["points"]
        assert [(p["learning_rate"], p["step"]) for p in points] == [(lr, s) for lr in LRS for s in STEPS]
        for p in points:
            ckpt = out / p["checkpoint"]
            assert ckpt == out / "grid" / name / f"lr-{runner._lr_label(p['learning_rate'])}" / f"step-{p['step']}"
            # the recorded sparsities are exactly a brute-force diff of the saved checkpoint against the base
            for label, tol in (("0", 0.0), ("1e-05", 1e-5)):
                assert p["changed"][label] == _changed(tiny_base, ckpt, tol)
            # the live bf16 view at the checkpoint's step is exactly what the saved checkpoint shows
            assert p["trace"][-1]["step"] == p["step"]
            assert p["trace"][-1]["bf16"] == pytest.approx(p["sparsity"]["1e-05"], abs=1e-12)
            assert max(h["step"] for h in p["log_history"]) == p["step"]
            assert p["probe_kl"] >= 0 and p["delta_norm"] > 0 and set(p["accuracy_gain"]) >= {"sub"}
        # one run per learning rate: step 1 and step 2 differ, and 1e-2 moved more weights than 1e-3
        by = {(p["learning_rate"], p["step"]): p for p in points}
        assert by[(1e-2, 2)]["changed"]["0"] > by[(1e-3, 2)]["changed"]["0"]
        assert trained_record.checkpoint_sha256(out / by[(1e-2, 1)]["checkpoint"]) != \
            trained_record.checkpoint_sha256(out / by[(1e-2, 2)]["checkpoint"])
        # the largest learning rate is trained and measured first (a grid stopped early holds it)
        assert (out / by[(1e-2, 2)]["checkpoint"] / "metrics.json").stat().st_mtime_ns < \
            (out / by[(1e-3, 1)]["checkpoint"] / "metrics.json").stat().st_mtime_ns


def test_grid_checkpoints_equal_separate_runs_of_that_many_steps(grid_run, tiny_base, tmp_path):
    tmp, recipes, out = grid_run
    # the sweep path, 1 and 2 steps at lr 1e-2 (constant schedule, same seed and data)
    for steps in STEPS:
        data = json.loads(open(recipes[0]).read())
        path = tmp_path / f"g_sft_{steps}.json"
        path.write_text(json.dumps({**data, "name": f"g_sft_{steps}", "steps": steps, "grid": None}))
        runner.run_lab([str(path)], _opts(tiny_base, tmp_path / f"run{steps}", report=False), log=lambda m: None)
        alone = tmp_path / f"run{steps}" / "runs" / f"g_sft_{steps}" / "lr-1e-2"
        assert trained_record.checkpoint_sha256(alone) == \
            trained_record.checkpoint_sha256(out / "grid/g_sft/lr-1e-2" / f"step-{steps}")


def test_grid_report_frontier_and_figure(grid_run):
    tmp, recipes, out = grid_run
    report = json.loads((out / "report.json").read_text())
    (grid,) = [f for f in report["findings"] if f["key"] == "grid"]
    results = json.loads((out / "results.json").read_text())
    for name, v in grid["data"]["recipes"].items():
        pts = [{"sparsity": p["sparsity"]["1e-05"], "gain": p["accuracy_gain"]["sub"], "lr": p["learning_rate"],
                "step": p["step"]} for p in results["grid"][name]["points"]]
        assert len(v["points"]) == 4
        frontier = {(p["lr"], p["step"]) for p in v["frontier"]}
        assert frontier == {(p["lr"], p["step"]) for p in _brute_frontier(pts)}
    assert (out / "figures" / "grid_frontier.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "## Grid: sparsity vs accuracy gain" in md and "lr \\ step" in md and "sparsity at matched levels" in md
    assert "## Runs" not in md  # a grid run has no sweep cells
    page = (out / "report.html").read_text()
    assert "Grid: sparsity vs accuracy gain" in page and "<td><b>" in page  # frontier cells in bold


def test_grid_resume_trains_only_what_is_missing(grid_run, tiny_base, monkeypatch):
    tmp, recipes, out = grid_run
    before = json.loads((out / "results.json").read_text())["grid"]
    calls = []
    real = runner.train_checkpoints
    monkeypatch.setattr(runner, "train_checkpoints", lambda *a, **k: calls.append((a[2], sorted(a[4]))) or real(*a, **k))
    copy = tmp / "copy"
    shutil.copytree(out, copy, symlinks=True)
    (copy / "grid/g_sft/lr-1e-3/step-1/metrics.json").unlink()  # measured again from its trained.json
    shutil.rmtree(copy / "grid/g_sft/lr-1e-2/step-2")  # trained again, to step 2 only
    runner.run_lab(recipes, _opts(tiny_base, copy, grid=True), log=lambda m: None, resume=True)
    assert calls == [(1e-2, [2])]
    after = json.loads((copy / "results.json").read_text())["grid"]
    drop = {"seconds", "eval_seconds", "eval_load_seconds", "step_cost", "phase_seconds"}
    for name in before:
        assert [{k: v for k, v in p.items() if k not in drop} for p in after[name]["points"]] == \
            [{k: v for k, v in p.items() if k not in drop} for p in before[name]["points"]]


def test_grid_needs_a_grid_on_every_named_recipe(tiny_base, tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"name": "plain", "algorithm": "sft", "steps": 2}))
    with pytest.raises(UsageError, match="have no 'grid'"):
        runner.run_lab([str(path)], _opts(tiny_base, tmp_path / "run", grid=True), log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_read_at_interpolates_between_bracketing_points_and_refuses_outside():
    frontier = [{"gain": 0.0, "sparsity": 0.9}, {"gain": 0.1, "sparsity": 0.5}, {"gain": 0.3, "sparsity": 0.1}]
    assert read_at(frontier, "gain", 0.05)["value"] == pytest.approx(0.7)
    assert read_at(frontier, "gain", 0.2)["value"] == pytest.approx(0.3)
    assert read_at(frontier, "gain", 0.1)["value"] == 0.5
    assert read_at(frontier, "gain", 0.1 - 1e-12)["value"] == 0.5  # a gain stored as 0.09999999999999998
    high = read_at(frontier, "gain", 0.31)
    assert high["value"] is None and not high["in_range"] and high["range"] == [0.0, 0.3]
    assert read_at(frontier, "gain", -0.01)["value"] is None
    assert read_at([], "gain", 0.1)["range"] is None


_point = st.fixed_dictionaries({"sparsity": st.sampled_from([0.1, 0.2, 0.5, 0.9]),
                                "gain": st.sampled_from([-0.1, 0.0, 0.05, 0.1])})


@settings(max_examples=200, deadline=None)
@given(st.lists(_point, max_size=12))
def test_pareto_frontier_equals_the_brute_force_filter(points):
    got = pareto_frontier(points)
    want = _brute_frontier(points)
    assert sorted((p["gain"], p["sparsity"]) for p in got) == sorted((p["gain"], p["sparsity"]) for p in want)
    assert [p["gain"] for p in got] == sorted(p["gain"] for p in got)


def _grid_point(lr, step, sparsity, gain, kl):
    return {"learning_rate": lr, "step": step, "sparsity": {"0": sparsity, "1e-05": sparsity},
            "accuracy_gain": {"add": gain}, "probe_kl": kl, "delta_norm": 1 - sparsity}


def _grid_results(n, rl_curve, sft_curve):
    """A grid run of one GRPO and one SFT recipe, each a list of (sparsity, gain, KL) at steps 10, 20, 40."""
    entry = lambda name, algo, curve: {  # noqa: E731
        "recipe": {"name": name, "algorithm": algo, "family": "add", "seed": 0},
        "points": [_grid_point(1e-5, s, *row) for s, row in zip((10, 20, 40), curve)]}
    return {"run": {"base": "b", "eval_family": "add",
                    "base_metadata": {"num_parameters": n, "config": {"hidden_size": n // 10_000}}},
            "recipes": {}, "grid": {"grpo": entry("grpo", "grpo", rl_curve), "sft_id": entry("sft_id", "sft", sft_curve)}}


def test_scale_trend_reads_grid_runs_along_each_frontier(tmp_path):
    from rlsparse.lab.verdicts.scale import render_trend, trend

    dirs = []
    # sizes given out of order; the small model's GRPO never reaches +10 points
    for n, rl, sft in ((2_000_000, [(0.9, 0.0, 0.01), (0.7, 0.05, 0.02), (0.5, 0.15, 0.04)],
                        [(0.8, 0.05, 0.01), (0.4, 0.2, 0.03), (0.2, 0.3, 0.05)]),
                       (500_000, [(0.9, 0.0, 0.01), (0.8, 0.02, 0.02), (0.6, 0.08, 0.04)],
                        [(0.6, 0.0, 0.01), (0.4, 0.1, 0.03), (0.3, 0.3, 0.05)])):
        d = tmp_path / f"run-{n}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(_grid_results(n, rl, sft)))
        dirs.append(d)
    f = trend(dirs)
    rows = f.data["rows"]
    assert [r["parameters"] for r in rows] == [500_000, 2_000_000]
    # 500k: GRPO's frontier tops out at +8 points (out of range); SFT reaches +10 at its step-20 point
    assert rows[0]["rl"] is None and rows[0]["sft"] == pytest.approx(0.4)
    assert rows[0]["grid"]["grpo"]["range"] == [0.0, 0.08]
    # 2M: GRPO between (0.7, +5) and (0.5, +15): 0.6; SFT between (0.8, +5) and (0.4, +20): 0.8 - 0.4/3
    assert rows[1]["rl"] == pytest.approx(0.6) and rows[1]["sft"] == pytest.approx(0.8 - 0.4 / 3)
    assert rows[1]["source"].startswith("grid frontier")
    # along the steps of the one learning rate: the same interpolation, first crossing of +10 points
    assert rows[1]["grid"]["grpo"]["along_steps_by_lr"] == {"1e-05": pytest.approx(0.6)}
    assert rows[0]["grid"]["grpo"]["along_steps_by_lr"] == {"1e-05": None}
    md = render_trend(dirs, tmp_path / "scale").read_text()
    assert "out of range (frontier gains +0.0 to +8.0 pts)" in md


def test_a_sweep_session_keeps_the_grid_and_the_report_shows_both(grid_run, tiny_base):
    tmp, recipes, out = grid_run
    both = tmp / "both"
    shutil.copytree(out, both, symlinks=True)
    runner.run_lab([recipes[0]], _opts(tiny_base, both, conjecture=False), log=lambda m: None, resume=True)
    results = json.loads((both / "results.json").read_text())
    assert set(results["grid"]) == {"g_sft", "g_dpo"} and set(results["recipes"]) == {"g_sft"}
    keys = [f["key"] for f in json.loads((both / "report.json").read_text())["findings"]]
    assert keys[0] == "grid" and "sparsity_sft_vs_rl" in keys


def test_the_pre_registered_grids_reach_the_papers_learning_rate():
    from rlsparse.lab.recipes import load_recipe, load_suite, recipe_names

    real = [load_recipe(n, suite="real") for n in load_suite("real").recipes]
    chosen = runner._grid_recipes(real, everything=True)
    assert [r.name for r in chosen] == ["sft_ood", "dpo_id", "grpo_nokl", "prime"]
    assert all(min(r.grid["learning_rates"]) == 5e-7 for r in chosen)
    tiny = runner._grid_recipes([load_recipe(n) for n in recipe_names()], everything=True)
    assert sorted(r.name for r in tiny) == ["dpo_id", "grpo", "prime", "sft_id", "sft_ood"]
    assert all(min(r.grid["learning_rates"]) == 5e-7 and r.quickened().grid["checkpoints"] == [25, 50, 100, 200]
               for r in tiny)


def test_a_grid_stopped_part_way_shows_what_it_measured(grid_run):
    from rlsparse.lab.report import render

    tmp, recipes, out = grid_run
    stopped = tmp / "stopped"
    shutil.copytree(out, stopped, symlinks=True)
    # as a run stopped during g_dpo's second learning rate leaves it: no results entry, no entry.json,
    # and lr 1e-3 (trained after 1e-2) without its checkpoints' metrics
    results = json.loads((stopped / "results.json").read_text())
    del results["grid"]["g_dpo"]
    (stopped / "results.json").write_text(json.dumps(results))
    (stopped / "grid/g_dpo/entry.json").unlink()
    for s in STEPS:
        (stopped / f"grid/g_dpo/lr-1e-3/step-{s}/metrics.json").unlink()
    render(stopped)
    findings = {f["key"]: f for f in json.loads((stopped / "report.json").read_text())["findings"]}
    dpo = findings["grid"]["data"]["recipes"]["g_dpo"]
    on_disk = [json.loads((stopped / f"grid/g_dpo/lr-1e-2/step-{s}/metrics.json").read_text()) for s in STEPS]
    assert [(p["lr"], p["step"], p["sparsity"]) for p in dpo["points"]] == \
        [(1e-2, s, m["sparsity"]["1e-05"]) for s, m in zip(STEPS, on_disk)]
    assert dpo["complete"] is False and dpo["planned"] == 4
    assert findings["grid"]["data"]["recipes"]["g_sft"]["complete"] is True
    assert "g_dpo (dpo, 2 checkpoints of 4 planned (the grid stopped part way)" in findings["grid"]["sentence"]
    # the Figure 1 reading on the grid says it is provisional and which grid is unfinished
    assert findings["figure1_grid"]["data"]["unfinished"] == ["g_dpo 2/4"]


@pytest.mark.parametrize("rl, sft, verdict, difference", [
    # RL frontier at +10 pts: between (0.9, +5) and (0.8, +15) = 0.85; SFT between (0.8, +5) and (0.4, +20) = 0.8 - 0.4/3
    ([(0.95, 0.0, 0.01), (0.9, 0.05, 0.02), (0.8, 0.15, 0.04)], [(0.8, 0.05, 0.01), (0.4, 0.2, 0.03), (0.2, 0.3, 0.05)],
     "reproduces", 0.85 - (0.8 - 0.4 / 3)),
    # RL sparser by 10 points, but 60% sparse: below the paper's lowest (68.5%)
    ([(0.9, 0.0, 0.01), (0.7, 0.05, 0.02), (0.5, 0.15, 0.04)], [(0.6, 0.05, 0.01), (0.3, 0.2, 0.03), (0.2, 0.3, 0.05)],
     "partly reproduces", 0.6 - 0.5),
    # SFT's frontier at +10 pts is 0.875: RL's 0.85 is 2.5 points less sparse
    ([(0.95, 0.0, 0.01), (0.9, 0.05, 0.02), (0.8, 0.15, 0.04)], [(0.95, 0.05, 0.01), (0.8, 0.15, 0.03), (0.5, 0.3, 0.05)],
     "does not reproduce at this scale", 0.85 - 0.875),
    # RL's frontier stops at +8 points
    ([(0.9, 0.0, 0.01), (0.8, 0.02, 0.02), (0.6, 0.08, 0.04)], [(0.8, 0.05, 0.01), (0.4, 0.2, 0.03), (0.2, 0.3, 0.05)],
     "not measured", None),
])
def test_figure1_on_the_grid_compares_frontiers_at_the_matched_gain(rl, sft, verdict, difference):
    from rlsparse.lab.report import findings

    got = {f.key: f for f in findings(_grid_results(1_000_000, rl, sft))}["figure1_grid"]
    assert got.verdict == verdict
    if difference is None:
        assert got.data["rl_minus_sft"] is None and got.data["sparsity_at_matched_gain"]["grpo"] is None
    else:
        assert got.data["rl_minus_sft"] == pytest.approx(difference)
        assert f"RL minus SFT {100 * difference:+.1f} points" in got.sentence


def test_figure1_on_the_grid_needs_both_an_rl_and_an_sft_grid():
    from rlsparse.lab.report import findings

    results = _grid_results(1_000_000, [(0.9, 0.0, 0.01), (0.8, 0.15, 0.04)], [(0.8, 0.05, 0.01), (0.4, 0.2, 0.03)])
    del results["grid"]["sft_id"]
    got = {f.key: f for f in findings(results)}["figure1_grid"]
    assert got.verdict == "not measured" and "an SFT recipe" in got.sentence


def test_a_grid_on_worker_processes_saves_the_same_checkpoints(grid_run, tiny_base):
    """--grid --jobs 2: one task per learning rate on two one-thread workers; every checkpoint is
    bit-identical to the one-process run's and the measured points equal it (timings aside)."""
    tmp, recipes, out = grid_run
    par = tmp / "par"
    log = []
    runner.run_lab(recipes, _opts(tiny_base, par, grid=True, jobs=2, threads=2), log=log.append)
    # four learning rates (two recipes x two) and the base accuracy they wait for
    assert "running 5 tasks on 2 worker processes, 1 torch thread each" in log
    one, two = (json.loads((d / "results.json").read_text())["grid"] for d in (out, par))
    drop = {"seconds", "eval_seconds", "eval_load_seconds", "step_cost", "phase_seconds"}
    for name in ("g_sft", "g_dpo"):
        for a, b in zip(one[name]["points"], two[name]["points"], strict=True):
            assert trained_record.checkpoint_sha256(out / a["checkpoint"]) == \
                trained_record.checkpoint_sha256(par / b["checkpoint"])
            assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
        summary = [{k: v for k, v in g[name].items() if k != "points"} for g in (one, two)]
        assert summary[0] == summary[1]


def test_grid_lrs_trains_part_of_a_grid_and_resume_trains_the_rest(grid_run, tiny_base, monkeypatch):
    """--grid-lrs 1e-3: only that learning rate of each grid is trained (its checkpoints equal the
    whole grid's), the entries say the grids are unfinished; a later session trains only the rest."""
    tmp, recipes, out = grid_run
    calls = []
    real = runner.train_checkpoints
    monkeypatch.setattr(runner, "train_checkpoints", lambda *a, **k: calls.append((a[1].name, a[2])) or real(*a, **k))
    part = tmp / "part"
    runner.run_lab(recipes, _opts(tiny_base, part, grid=True, grid_learning_rates=[1e-3]), log=lambda m: None)
    assert calls == [("g_sft", 1e-3), ("g_dpo", 1e-3)]
    whole = json.loads((out / "results.json").read_text())["grid"]
    drop = {"seconds", "eval_seconds", "eval_load_seconds", "step_cost", "phase_seconds"}
    strip = lambda points: [{k: v for k, v in p.items() if k not in drop} for p in points]  # noqa: E731
    got = json.loads((part / "results.json").read_text())["grid"]
    for name in ("g_sft", "g_dpo"):
        assert got[name]["complete"] is False
        assert strip(got[name]["points"]) == strip([p for p in whole[name]["points"] if p["learning_rate"] == 1e-3])
    calls.clear()
    runner.run_lab(recipes, _opts(tiny_base, part, grid=True), log=lambda m: None, resume=True)
    assert calls == [("g_sft", 1e-2), ("g_dpo", 1e-2)]
    got = json.loads((part / "results.json").read_text())["grid"]
    for name in ("g_sft", "g_dpo"):
        assert got[name]["complete"] is True and strip(got[name]["points"]) == strip(whole[name]["points"])


def test_grid_lrs_must_be_learning_rates_of_the_grids(grid_run, tiny_base, tmp_path):
    _, recipes, _ = grid_run
    with pytest.raises(UsageError, match=r"--grid-lrs 5e-05: not a learning rate of these recipes' grids \(0.001, 0.01\)"):
        runner.run_lab(recipes, _opts(tiny_base, tmp_path / "run", grid=True, grid_learning_rates=[1e-3, 5e-5]),
                       log=lambda m: None)
    assert not (tmp_path / "run").exists()
