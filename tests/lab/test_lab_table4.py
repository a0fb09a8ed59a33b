"""Table 4 on a finished run (``lab.overlaps``): every row against a brute-force count on the bf16
bits of its two checkpoints, both nulls against their formulas, the cache, and the declared pairs
that name a cell the run does not hold."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlsparse.errors import UsageError
from rlsparse.lab import overlaps
from rlsparse.lab.preregistration import load_preregistration
from rlsparse.lab.recipes import Suite
from rlsparse.lab.verdicts import table4
from tests.tinymodels import brute_changed, state, tiny_llama

PRE = load_preregistration()
TOL = 1e-5


def _finetuned(base: Path, out: Path, seed: int, share: float) -> Path:
    """The base with ``share`` of its elements moved by a random relative amount (some below 1e-5 in value)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            chosen = torch.rand(p.shape, generator=gen) < share
            scale = torch.exp(torch.empty(p.shape).uniform_(-12, -2, generator=gen))  # 6e-6 .. 0.14 relative
            sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
            moved = p.float() * (1 + sign * scale) + sign * scale * 1e-3
            p.copy_(torch.where(chosen, moved, p.float()).to(p.dtype))
    model.save_pretrained(out, max_shard_size="20KB")
    return out


def _point(checkpoint: str, seed: int = 0, lr: float = 1e-5) -> dict:
    return {"learning_rate": lr, "seed": seed, "checkpoint": checkpoint, "start": "base"}


def _run(tmp_path: Path, pairs: list[dict]) -> tuple[Path, dict]:
    """A run folder: a tiny bf16 base, five finetunes and a reseeded Conjecture 1 run, and its results.json."""
    run = tmp_path / "run"
    tiny_llama(seed=0).save_pretrained(run / "base", max_shard_size="20KB")
    cells = {"dpo_id": (1, 0.30), "dpo_ood": (2, 0.25), "prime": (3, 0.10), "sft_ood": (4, 0.40), "rft": (5, 0.35)}
    recipes = {}
    for name, (seed, share) in cells.items():
        _finetuned(run / "base", run / "runs" / name / "lr-1e-5", seed, share)
        algo = {"dpo_id": "dpo", "dpo_ood": "dpo", "prime": "prime", "sft_ood": "sft", "rft": "rft"}[name]
        recipes[name] = {"recipe": {"name": name, "algorithm": algo, "seed": 0},
                         "points": [_point(f"runs/{name}/lr-1e-5")]}
    _finetuned(run / "base", run / "conjecture" / "dpo_id" / "reseeded", 6, 0.30)
    conj = {"dpo_id": {"recipe": "dpo_id", "learning_rate": 1e-5, "seed": 0, "full_checkpoint": "runs/dpo_id/lr-1e-5",
                       "reseeded_checkpoint": "conjecture/dpo_id/reseeded"}}
    results = {"run": {"base": str(run / "base"), "table4_pairs": pairs, "table4_declared": "by the test"},
               "recipes": recipes, "conjecture": conj}
    (run / "results.json").write_text(json.dumps(results))
    return run, results


PAIRS = [{"a": "dpo_id", "b": "dpo_ood", "factor": "data", "why": "pairs"},
         {"a": "rft", "b": "sft_ood", "factor": "data"},
         {"a": "dpo_id", "b": "prime", "factor": "algorithm"},
         {"a": "dpo_id", "b": "ppo", "factor": "algorithm"}]  # ppo did not run


def _brute(run: Path, a: str, b: str) -> dict:
    """Counts by brute force on the bf16 values, and the stratified expectation from its formula:
    sum over (tensor, bf16 exponent of the base value) cells of a_c * b_c / n_c."""
    base, sa, sb = state(run / "base"), state(run / a), state(run / b)
    n = ca = cb = both = 0
    expected = 0.0
    for name, w in base.items():
        ma = brute_changed(w, sa[name], TOL).numpy().ravel()
        mb = brute_changed(w, sb[name], TOL).numpy().ravel()
        exponent = (w.contiguous().view(torch.int16).numpy().astype(np.uint16).ravel() >> 7) & 0xFF
        for e in np.unique(exponent):
            cell = exponent == e
            expected += float(ma[cell].sum()) * float(mb[cell].sum()) / float(cell.sum())
        n, ca, cb, both = n + w.numel(), ca + int(ma.sum()), cb + int(mb.sum()), both + int((ma & mb).sum())
    return {"numel": n, "changed_a": ca, "changed_b": cb, "intersection": both, "expected": expected}


def test_rows_equal_a_brute_force_count_and_the_null_formulas(tmp_path):
    run, results = _run(tmp_path, PAIRS)
    doc = overlaps.table4_rows(run, results)
    measured = [r for r in doc["rows"] if "not_measured" not in r]
    assert [(r["factor"], r["a"], r["b"]) for r in measured] == [
        ("seed", "dpo_id", "dpo_id"), ("data", "dpo_id", "dpo_ood"), ("data", "rft", "sft_ood"),
        ("algorithm", "dpo_id", "prime")]
    assert measured[0]["b_checkpoint"] == "conjecture/dpo_id/reseeded" and measured[0]["seeds"] == [0, 1]
    for r in measured:
        ref = _brute(run, r["a_checkpoint"], r["b_checkpoint"])
        assert 0 < ref["intersection"] < min(ref["changed_a"], ref["changed_b"])  # a case that can fail
        assert (r["numel"], r["changed_a"], r["changed_b"], r["intersection"]) == (
            ref["numel"], ref["changed_a"], ref["changed_b"], ref["intersection"])
        assert r["o1"] == ref["intersection"] / ref["changed_a"] and r["o2"] == ref["intersection"] / ref["changed_b"]
        # Appendix E: a uniformly random subnetwork of B's size covers B's density of A (and vice versa)
        assert r["o1_random"] == ref["changed_b"] / ref["numel"] and r["o2_random"] == ref["changed_a"] / ref["numel"]
        assert r["o1_stratified"] == pytest.approx(ref["expected"] / ref["changed_a"], rel=1e-12)
        assert r["o2_stratified"] == pytest.approx(ref["expected"] / ref["changed_b"], rel=1e-12)
        assert r["sparsity_a"] == 1 - ref["changed_a"] / ref["numel"]
    # the cache in the run folder holds the same rows
    assert json.loads((run / "table4.json").read_text())["rows"] == json.loads(json.dumps(doc["rows"]))


def test_a_declared_pair_naming_a_cell_the_run_lacks_is_a_not_measured_row(tmp_path):
    run, results = _run(tmp_path, PAIRS)
    rows = overlaps.table4_rows(run, results)["rows"]
    missing = [r for r in rows if r.get("not_measured")]
    assert [(r["a"], r["b"], r["not_measured"]) for r in missing] == [
        ("dpo_id", "ppo", "recipe ppo did not run in this run")]
    results["table4"] = {"rows": rows, "declared": "by the test"}
    f = table4.finding(results, PRE)
    text = "\n".join(table4.markdown(f))
    assert "not measured: recipe ppo did not run in this run" in text and "paper: DPO vs PRIME" in text
    # the SFT pair is shown, not judged; the rest are
    judged = {(r["a"], r["b"]): r["judged"] for r in f.data["rows"]}
    assert judged == {("dpo_id", "dpo_id"): True, ("dpo_id", "dpo_ood"): True, ("rft", "sft_ood"): False,
                      ("dpo_id", "prime"): True, ("dpo_id", "ppo"): False}


def test_a_checkpoint_gone_from_the_run_folder_is_a_not_measured_row(tmp_path):
    import shutil

    run, results = _run(tmp_path, PAIRS[:1])
    shutil.rmtree(run / "runs" / "dpo_ood")
    row = overlaps.table4_rows(run, results)["rows"][1]
    assert row["not_measured"] == "checkpoint runs/dpo_ood/lr-1e-5 is not in the run folder"


def test_cached_rows_are_read_back_and_a_changed_checkpoint_is_measured_again(tmp_path, monkeypatch):
    run, results = _run(tmp_path, PAIRS[:1])
    first = overlaps.table4_rows(run, results)["rows"]

    def refuse(*args, **kwargs):
        raise AssertionError("a cached row was measured again")

    with monkeypatch.context() as m:
        m.setattr(overlaps.measure, "subnetwork_mask", refuse)
        assert overlaps.table4_rows(run, results)["rows"] == first
    import shutil

    shutil.rmtree(run / "runs" / "dpo_ood" / "lr-1e-5")
    _finetuned(run / "base", run / "runs" / "dpo_ood" / "lr-1e-5", 9, 0.05)
    again = overlaps.table4_rows(run, results)["rows"]
    assert again[0] == first[0]  # the seed row's checkpoints did not change
    ref = _brute(run, "runs/dpo_id/lr-1e-5", "runs/dpo_ood/lr-1e-5")
    assert again[1]["intersection"] == ref["intersection"] != first[1]["intersection"]


def test_a_suite_pair_naming_a_recipe_it_does_not_have_is_refused_in_one_line():
    with pytest.raises(UsageError) as err:
        Suite(name="real", base="smollm2-135m", recipes=["dpo_id", "prime"],
              table4_pairs=[{"a": "dpo_id", "b": "ppo", "factor": "algorithm"}])
    assert "table4_pairs[0] names ['ppo']" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="factor 'lr'"):
        Suite(name="real", base="smollm2-135m", recipes=["dpo_id", "prime"],
              table4_pairs=[{"a": "dpo_id", "b": "prime", "factor": "lr"}])


def test_the_real_suite_declares_pairs_of_its_own_recipes():
    from rlsparse.lab.recipes import load_suite

    suite = load_suite("real")
    assert {p["factor"] for p in suite.table4_pairs} == {"data", "algorithm"} and suite.table4_declared
    assert all(p["a"] in suite.quick_recipes and p["b"] in suite.quick_recipes for p in suite.table4_pairs)


# The verdict over every row ------------------------------------------------------------------

def _row(factor, o, uniform, strat, a="grpo", b="ppo"):
    return {"factor": factor, "a": a, "b": b, "learning_rate": 1e-5, "seeds": [0, 1], "o1": o, "o2": o,
            "o1_random": uniform, "o2_random": uniform, "o1_stratified": strat, "o2_stratified": strat}


def _results(*rows):
    recipes = {n: {"recipe": {"name": n, "algorithm": a}, "points": []}
               for n, a in (("grpo", "grpo"), ("ppo", "ppo"), ("rft", "rft"), ("sft_ood", "sft"))}
    return {"run": {}, "recipes": recipes, "conjecture": {}, "table4": {"rows": list(rows)}}


def test_the_verdict_needs_every_setting_above_the_stratified_null():
    good = [_row(f, 0.6, 0.05, 0.5) for f in ("seed", "data", "algorithm")]
    assert table4.finding(_results(*good), PRE).verdict == "reproduces"
    # an SFT row below both nulls is context: it does not change the verdict
    assert table4.finding(_results(*good, _row("data", 0.01, 0.05, 0.5, "rft", "sft_ood")), PRE).verdict == "reproduces"
    # one row above the uniform null but within the 2-point margin of the stratified one
    near = good[:2] + [_row("algorithm", 0.6, 0.05, 0.59)]
    assert table4.finding(_results(*near), PRE).verdict == "partly reproduces"
    # every row above the stratified null, but a setting not measured
    assert table4.finding(_results(*good[:2]), PRE).verdict == "partly reproduces"
    below = [_row(f, 0.06, 0.05, 0.06) for f in ("seed", "data", "algorithm")]
    assert table4.finding(_results(*below), PRE).verdict == "does not reproduce at this scale"
    assert table4.finding(_results(), PRE).verdict == "not measured"


def test_o2_counts_too():
    rows = [_row(f, 0.6, 0.05, 0.5) for f in ("seed", "data", "algorithm")]
    rows[1]["o2"] = 0.51  # o2 within the margin of its stratified null
    assert table4.finding(_results(*rows), PRE).verdict == "partly reproduces"


def test_a_run_records_its_suites_pairs_and_an_older_real_run_takes_the_suite_files():
    from rlsparse.lab import runner
    from rlsparse.lab.recipes import load_suite

    suite = load_suite("real")
    opts = runner.LabOptions(out=Path("unused"))
    runner.apply_suite(opts, suite)
    assert (opts.table4_pairs, opts.table4_declared) == (suite.table4_pairs, suite.table4_declared)
    recorded = {"table4_pairs": [PAIRS[0]], "table4_declared": "then", "real_base": "smollm2-135m"}
    assert overlaps.declared_pairs(recorded) == ([PAIRS[0]], "then")
    older, said = overlaps.declared_pairs({"real_base": "smollm2-135m"})
    assert older == suite.table4_pairs and "Not in this run's run.json" in said
    assert overlaps.declared_pairs({"real_base": None}) == ([], "")  # a tiny-base run without a suite
    assert overlaps.declared_pairs({"table4_pairs": [], "table4_declared": ""}) == ([], "")


def test_the_figure_is_drawn_from_the_rows(tmp_path):
    from rlsparse.lab.verdicts import plots

    f = table4.finding(_results(*[_row(x, 0.6, 0.05, 0.5) for x in ("seed", "data", "algorithm")]), PRE)
    assert f.figure == "table4_overlap.png" and len(f.data["rows"]) == 3 and set(f.data["paper"]) == set(table4.FACTORS)
    assert plots.plot(f, tmp_path)
    assert (tmp_path / f.figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unreadable_cache_is_measured_again(tmp_path):
    run, results = _run(tmp_path, PAIRS[:1])
    (run / "table4.json").write_text("{not json")
    lines = []
    rows = overlaps.table4_rows(run, results, log=lines.append)["rows"]
    assert rows[1]["intersection"] == _brute(run, "runs/dpo_id/lr-1e-5", "runs/dpo_ood/lr-1e-5")["intersection"]
    assert json.loads((run / "table4.json").read_text())["rows"][1]["intersection"] == rows[1]["intersection"]
    assert "subnetwork 3/3" in lines[2] and "ETA 0s" in lines[2]  # progress: one line per mask


def test_a_sweep_of_three_seeds_gets_its_further_seed_pairs(tmp_path):
    run, results = _run(tmp_path, [])
    for seed in (0, 1, 2):
        folder = f"runs/grpo/lr-1e-5" + ("" if seed == 0 else f"-seed{seed}")
        _finetuned(run / "base", run / folder, 10 + seed, 0.2)
    results["recipes"]["grpo"] = {"recipe": {"name": "grpo", "algorithm": "grpo", "seed": 0},
                                  "points": [_point(f"runs/grpo/lr-1e-5" + ("" if s == 0 else f"-seed{s}"), s)
                                             for s in (0, 1, 2)]}
    rows = [r for r in overlaps.table4_rows(run, results)["rows"] if r["a"] == "grpo"]
    assert [r["seeds"] for r in rows] == [[0, 2], [1, 2]]  # 0/1 is the runner's seed_overlap
    for r in rows:
        ref = _brute(run, r["a_checkpoint"], r["b_checkpoint"])
        assert (r["changed_a"], r["changed_b"], r["intersection"]) == (ref["changed_a"], ref["changed_b"],
                                                                       ref["intersection"])


def test_a_declared_pair_run_with_three_seeds_gets_a_row_per_seed_both_ran(tmp_path):
    run, results = _run(tmp_path, [{"a": "dpo_id", "b": "prime", "factor": "algorithm"}])
    for name, shift in (("dpo_id", 20), ("prime", 30)):
        for seed in (1, 2):
            folder = f"runs/{name}/lr-1e-5-seed{seed}"
            _finetuned(run / "base", run / folder, shift + seed, 0.2)
            if name == "dpo_id" or seed == 1:  # prime ran seeds 0 and 1 only: seed 2 has no partner
                results["recipes"][name]["points"].append(_point(folder, seed))
    rows = [r for r in overlaps.table4_rows(run, results)["rows"] if r["factor"] == "algorithm"]
    assert [r["seeds"] for r in rows] == [[0, 0], [1, 1]]
    assert [r["b_checkpoint"] for r in rows] == ["runs/prime/lr-1e-5", "runs/prime/lr-1e-5-seed1"]
    for r in rows:
        ref = _brute(run, r["a_checkpoint"], r["b_checkpoint"])
        assert (r["changed_a"], r["changed_b"], r["intersection"]) == (ref["changed_a"], ref["changed_b"],
                                                                       ref["intersection"])
    assert [table4.label(r) for r in rows] == ["algorithm: dpo_id vs prime lr 1e-05 seed 0",
                                               "algorithm: dpo_id vs prime lr 1e-05 seed 1"]
