"""Predictors on runs built in the test: a synthetic run whose final mask is known by
construction (recall exact), AdamW state from a real Trainer mapped to names, the resume-with-mask
path, and the bad inputs (one-line errors)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rlsparse.errors import CheckpointError, MismatchError, UsageError
from rlsparse.masks import Mask
from rlsparse.predict import (checkpoint_at, from_checkpoints, from_optimizer, from_precision, load_moments, score,
                              uniform)
from rlsparse.predict.weights import base_spacing
from tinymodels import save, tiny_llama
from trainhelpers import int_view, make_model

# --- a synthetic run: known elements change at known steps ------------------------------------------


def _changed_copy(base: dict, picks: dict[str, list[int]], dtype=torch.bfloat16) -> dict:
    out = {}
    for n, t in base.items():
        flat = t.float().reshape(-1).clone()
        for i in picks.get(n, []):
            flat[i] += 0.5  # far above the tolerance and the bf16 spacing of these weights
        out[n] = flat.reshape(t.shape).to(dtype)
    return out


@pytest.fixture
def synthetic_run(tmp_path):
    base_model = tiny_llama(seed=0)
    base = save(base_model, tmp_path / "base", shard=None)
    sd = {n: t.clone() for n, t in base_model.state_dict().items()}
    names = sorted(sd)
    q, k = names[5], names[9]
    s1 = {q: [0, 3, 7]}
    s2 = {q: [0, 3, 7, 11], k: [2]}
    s3 = {q: [0, 7, 11, 20], k: [2, 5]}          # element 3 was cancelled (changed, then not)
    final = {q: [0, 7, 11, 20, 21], k: [2, 5, 9]}
    run = tmp_path / "run"
    for step, picks in ((1, s1), (2, s2), (3, s3)):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        save_file(_changed_copy(sd, picks), str(run / f"checkpoint-{step}" / "model.safetensors"))
    (tmp_path / "final").mkdir()
    save_file(_changed_copy(sd, final), str(tmp_path / "final" / "model.safetensors"))
    truth = Mask.from_tensors({n: _bits(t.shape, final.get(n, [])) for n, t in sd.items()})
    return base, run, tmp_path / "final", truth, {"s1": s1, "s2": s2, "s3": s3, "final": final}


def _bits(shape, idx) -> torch.Tensor:
    b = torch.zeros(int(np.prod(shape)), dtype=torch.bool)
    b[list(idx)] = True
    return b.reshape(shape)


def _as_sets(mask: Mask) -> set[tuple[str, int]]:
    return {(n, int(i)) for n in mask.names for i in torch.nonzero(mask.get(n).reshape(-1)).reshape(-1)}


def _pairs(picks: dict) -> set[tuple[str, int]]:
    return {(n, i) for n, idx in picks.items() for i in idx}


def test_synthetic_run_recall_is_exact(synthetic_run):
    base, run, final, truth, sets = synthetic_run
    cks = [checkpoint_at(run, s) for s in (1, 2, 3)]
    F = _pairs(sets["final"])
    assert _as_sets(truth) == F
    for method, want in (("checkpoint", _pairs(sets["s3"])),
                         ("union", _pairs(sets["s1"]) | _pairs(sets["s2"]) | _pairs(sets["s3"])),
                         ("vote", {x for x in _pairs(sets["s3"]) | _pairs(sets["s2"])
                                   if sum(x in _pairs(sets[s]) for s in ("s1", "s2", "s3")) >= 2})):
        pred = from_checkpoints(base, cks, method=method).mask()
        assert _as_sets(pred) == want, method
        s = score(pred, truth)
        assert s.hits == len(want & F)
        assert s.recall == len(want & F) / len(F)
        assert s.precision == len(want & F) / len(want)
    # another run's final mask as the predictor: the final itself, recall exactly 1
    s = score(from_checkpoints(base, [final], predictor="run").mask(), truth)
    assert (s.recall, s.precision) == (1.0, 1.0)


def test_at_the_final_density_the_changed_elements_come_first(synthetic_run):
    base, run, _, truth, sets = synthetic_run
    pred = from_checkpoints(base, [checkpoint_at(run, 3)])
    m = pred.mask(density=truth.density)
    assert m.ones == truth.ones
    assert _pairs(sets["s3"]) <= _as_sets(m)  # the rest is a random fill among score-0 ties


def test_fp32_checkpoints_are_seen_in_the_base_dtype(tmp_path):
    model = tiny_llama(seed=0)
    base = save(model, tmp_path / "base", shard=None)
    name = "model.layers.0.mlp.up_proj.weight"
    sd = {n: t.float().clone() for n, t in model.state_dict().items()}
    sp = torch.from_numpy(base_spacing(base)[name])
    flat = sd[name].reshape(-1)
    flat[:4] += sp.reshape(-1)[:4] * 0.25   # rounds back to the base value in bf16: unchanged
    flat[4:8] += sp.reshape(-1)[4:8] * 1.5  # lands on another bf16 value: changed
    (tmp_path / "ck").mkdir()
    save_file(sd, str(tmp_path / "ck" / "model.safetensors"))
    m = from_checkpoints(base, [tmp_path / "ck"], tolerance=0.0).mask()
    assert m.ones == 4 and m.get(name).reshape(-1)[4:8].all()


def test_precision_and_random_predictors(tmp_path):
    base = save(tiny_llama(seed=0), tmp_path / "base", shard=None)
    spacing = base_spacing(base)
    lr, steps = 1e-5, 30
    m = from_precision(base, lr=lr, steps=steps).mask()
    want = sum(int((s / 2 < lr * steps).sum()) for s in spacing.values())
    assert m.ones == want
    r = uniform({n: s.shape for n, s in spacing.items()}).mask(density=0.1)
    assert r.ones == round(0.1 * r.numel)
    with pytest.raises(UsageError, match="natural threshold"):
        uniform({"w": (2, 2)}).mask()


def test_step_beyond_the_run_is_refused(synthetic_run):
    _, run, *_ = synthetic_run
    with pytest.raises(UsageError, match="step 9 is beyond the run .* up to step 3"):
        checkpoint_at(run, 9)


# --- a real Trainer: AdamW state, and resuming with a mask ---------------------------------------------


def _trainer(model, out: Path, steps: int, callbacks=(), save_steps: int = 2):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 70, (32, 12), generator=g)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             weight_decay=0.1, save_strategy="steps", save_steps=save_steps, report_to="none",
                             use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0, data_seed=0)
    return Trainer(model=model, args=args, train_dataset=ds, callbacks=list(callbacks))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("trainer")
    model = make_model()
    base = tmp / "base"
    model.to(torch.bfloat16).save_pretrained(base)
    model = model.float()
    t = _trainer(model, tmp / "run", steps=4)
    t.train()
    live = {n: {k: v.clone() for k, v in t.optimizer.state[p].items()} for n, p in model.named_parameters()}
    return base, tmp / "run", live


def test_optimizer_moments_map_to_parameter_names(trained):
    _, run, live = trained
    moments, info = load_moments(run / "checkpoint-4")
    assert set(moments) == set(live)
    for name, m in moments.items():
        assert np.array_equal(m["exp_avg"], live[name]["exp_avg"].numpy()), name
        assert np.array_equal(m["exp_avg_sq"], live[name]["exp_avg_sq"].numpy()), name
    assert info["step"] == 4.0


def test_adam_scores_follow_their_formulas(trained):
    base, run, _ = trained
    ck = run / "checkpoint-4"
    moments, info = load_moments(ck)
    name = "model.layers.1.self_attn.v_proj.weight"
    m, v = moments[name]["exp_avg"], moments[name]["exp_avg_sq"]
    b1, b2 = info["betas"]
    ratio = (np.abs(m) / (1 - b1 ** 4)) / (np.sqrt(v / (1 - b2 ** 4)) + info["eps"])
    got = from_optimizer(base, ck, score="adam_ratio").scores[name]
    np.testing.assert_allclose(got, ratio, rtol=1e-6)
    drift = from_optimizer(base, ck, score="adam_drift", horizon=10)
    want = info["lr"] * 10 * ratio / (base_spacing(base)[name] / 2)
    np.testing.assert_allclose(drift.scores[name], want, rtol=1e-5)
    assert drift.threshold == 1.0 and drift.params["horizon"] == 10


def test_optimizer_state_without_moments_or_from_another_model(trained, tmp_path):
    base, run, _ = trained
    ck = tmp_path / "checkpoint-4"
    shutil.copytree(run / "checkpoint-4", ck)
    sgd = torch.optim.SGD(make_model().parameters(), lr=0.1, momentum=0.9)
    for p in sgd.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    sgd.step()
    torch.save(sgd.state_dict(), ck / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"found optimizer state with keys \['momentum_buffer'\] but no AdamW"):
        load_moments(ck)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=80))
    opt = torch.optim.AdamW([{"params": [p for n, p in other.named_parameters() if "norm" not in n]},
                             {"params": [p for n, p in other.named_parameters() if "norm" in n]}])
    for p in other.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    torch.save(opt.state_dict(), ck / "optimizer.pt")
    with pytest.raises(MismatchError, match="from another model: .* shapes differ"):
        load_moments(ck)
    (ck / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="no optimizer.pt"):
        load_moments(ck)


def test_resume_with_mask_keeps_masked_out_entries_bit_identical(trained, tmp_path):
    from rlsparse.train import MaskCallback
    from trainhelpers import random_mask

    _, run, _ = trained
    start = load_file(str(run / "checkpoint-2" / "model.safetensors"))
    model = make_model()
    mask = random_mask(model, density=0.3, seed=3)
    t = _trainer(model, tmp_path / "resumed", steps=6, callbacks=[MaskCallback(mask)], save_steps=100)
    t.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert t.state.global_step == 6
    moved_in = 0
    for name, p in model.named_parameters():
        keep = ~mask.get(name)
        a, b = int_view(start[name]), int_view(p.detach())
        assert torch.equal(a[keep], b[keep]), f"{name}: masked-out elements moved after step 2"
        moved_in += int((a[~keep] != b[~keep]).sum())
    assert moved_in > 0


# --- the command line -------------------------------------------------------------------------------


def _cli(args, capsys) -> tuple[int, str, str]:
    from rlsparse.cli.main import main

    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_predict_and_score(synthetic_run, tmp_path, capsys):
    import json

    base, run, final, truth, sets = synthetic_run
    truth.save(tmp_path / "final.mask.safetensors")
    p_mask, p_scores, f_mask = (str(tmp_path / f) for f in ("p.mask.safetensors", "p.scores.safetensors",
                                                             "final.mask.safetensors"))
    rc, out, _ = _cli(["predict", "checkpoints", str(base), "--run", str(run), "--step", "2", "--method", "union",
                       "--out", p_mask, "--scores", p_scores], capsys)
    assert rc == 0 and "union:" in out
    pred = Mask.load(tmp_path / "p.mask.safetensors")
    assert _as_sets(pred) == _pairs(sets["s1"]) | _pairs(sets["s2"])
    rc, out, _ = _cli(["predict", "score", p_mask, f_mask, "--scores", p_scores, "--base", str(base),
                       "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")], capsys)
    assert rc == 0 and (tmp_path / "s.png").stat().st_size > 0
    doc = json.loads((tmp_path / "s.json").read_text())
    both = len((_pairs(sets["s1"]) | _pairs(sets["s2"])) & _pairs(sets["final"]))
    assert doc["intersection"] == both and doc["recall"] == both / len(_pairs(sets["final"]))
    assert doc["schema_version"] == 1 and doc["stratified"]["recall"] is not None


@pytest.mark.parametrize("case", ["beyond", "no_moments", "other_masks", "density"])
def test_cli_bad_input_is_one_line_exit_2(case, synthetic_run, trained, tmp_path, capsys):
    base, run, _, truth, _ = synthetic_run
    out = str(tmp_path / "x.mask.safetensors")
    if case == "beyond":
        args = ["predict", "checkpoints", str(base), "--run", str(run), "--step", "7", "--out", out]
        expect = "step 7 is beyond the run"
    elif case == "no_moments":
        ck = tmp_path / "checkpoint-4"
        shutil.copytree(trained[1] / "checkpoint-4", ck)
        torch.save({"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"params": [0]}]}, ck / "optimizer.pt")
        args = ["predict", "optimizer", str(trained[0]), str(ck), "--out", out]
        expect = "found optimizer state with keys ['step'] but no AdamW moments"
    elif case == "other_masks":
        truth.save(tmp_path / "a.mask.safetensors")
        Mask.from_tensors({"w": torch.ones(3, dtype=torch.bool)}).save(tmp_path / "b.mask.safetensors")
        args = ["predict", "score", str(tmp_path / "a.mask.safetensors"), str(tmp_path / "b.mask.safetensors")]
        expect = "do not describe the same model"
    else:
        args = ["predict", "precision", str(base), "--density", "1.5", "--out", out]
        expect = "--density 1.5"
    rc, stdout, err = _cli(args, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and expect in err and "Traceback" not in err
    assert not Path(out).exists()
