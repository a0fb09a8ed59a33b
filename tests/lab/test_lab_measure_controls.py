"""The measurements the verdicts match on, against brute-force references on the tiny base."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from rlsparse.lab import data as labdata
from rlsparse.lab import measure, overlaps
from rlsparse.lab.base import load_model
from rlsparse.lab.tasks import split


def _copy(src, dst, edit):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    w = load_file(str(src / "model.safetensors"))
    for name in list(w):
        w[name] = edit(name, w[name].to(torch.float32)).to(torch.bfloat16)
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return w


def test_delta_norm_is_the_fp32_l2_norm_over_every_parameter(tiny_base, tmp_path):
    gen = torch.Generator().manual_seed(0)
    after = _copy(tiny_base, tmp_path / "ft", lambda n, t: t + 0.01 * torch.randn(t.shape, generator=gen))
    before = load_file(str(tiny_base / "model.safetensors"))
    ref = math.sqrt(sum(float(((after[k].double() - before[k].double()) ** 2).sum()) for k in before))
    assert measure.delta_norm(tiny_base, tmp_path / "ft") == pytest.approx(ref, rel=1e-12)
    assert measure.delta_norm(tiny_base, tiny_base) == 0.0


def test_random_rank_control_permutes_a_rank_one_update_into_a_full_rank_one(tiny_base, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    zero = lambda n, t: torch.zeros_like(t) if n == name else t  # noqa: E731

    def edit(n, t):
        if n != name:
            return t
        u = torch.arange(t.shape[0]) % 2 + 1.0
        v = torch.arange(t.shape[1]) % 3 + 1.0
        return torch.outer(u, v)  # small integers: exact in bf16, so the update is exactly rank 1

    _copy(tiny_base, tmp_path / "base", zero)
    _copy(tiny_base, tmp_path / "ft", lambda n, t: edit(n, zero(n, t)))
    r = measure.random_rank_control(tmp_path / "base", tmp_path / "ft", seed=0)
    assert list(r["per_matrix"]) == [name]  # only the changed matrix
    row = r["per_matrix"][name]
    full = min(load_file(str(tiny_base / "model.safetensors"))[name].shape)
    ranks = measure.update_rank(tmp_path / "base", tmp_path / "ft")["per_matrix"]  # the update itself: rank 1
    assert ranks[name] == 1 / full and set(ranks.values()) == {0.0, 1 / full}
    assert row["control_rank_fraction"] == 1.0
    assert row["density"] == 1.0


def test_spacing_share_matches_a_brute_force_count(tiny_base):
    shares = measure.spacing_share(tiny_base, tolerances=("0", "1e-06", "1e-05", "1e-04"))
    w = load_file(str(tiny_base / "model.safetensors"))
    total = sum(t.numel() for t in w.values())
    for label in ("1e-06", "1e-05", "1e-04"):
        above = 0
        for t in w.values():
            x = t.view(-1).view(torch.int16).numpy().astype(np.int32) & 0xFFFF
            up = ((x + 1) & 0xFFFF).astype(np.uint16).view(np.int16)
            down = ((x - 1) & 0xFFFF).astype(np.uint16).view(np.int16)
            val = torch.from_numpy(x.astype(np.uint16).view(np.int16)).view(torch.bfloat16).float()
            # next representable values away from and towards zero (same sign): the grid spacing at x
            a = (torch.from_numpy(up).view(torch.bfloat16).float() - val).abs()
            b = (torch.from_numpy(down).view(torch.bfloat16).float() - val).abs()
            zero = val == 0
            spacing = torch.where(zero, a, torch.minimum(a, b))
            above += int((spacing > float(label)).sum())
        assert shares[label] == pytest.approx(above / total, abs=2 / total), label
    assert shares["0"] == 1.0


def test_probe_kl_and_dataset_nll_match_a_per_example_loop(tiny_base, tmp_path):
    gen = torch.Generator().manual_seed(1)
    _copy(tiny_base, tmp_path / "ft", lambda n, t: t + 0.05 * torch.randn(t.shape, generator=gen))
    base, tok = load_model(tiny_base)
    ft, _ = load_model(tmp_path / "ft")
    pairs = [(p.prompt, p.answer) for p in split("add", seed=0, n_test=12)[1]]
    kl_sum = nll_sum = n = 0.0
    with torch.no_grad():
        for prompt, answer in pairs:
            ids = tok(prompt + answer + tok.eos_token, add_special_tokens=False, return_tensors="pt")["input_ids"]
            start = len(tok(prompt, add_special_tokens=False)["input_ids"])
            lb = torch.log_softmax(base(ids).logits[0].double(), -1)
            lf = torch.log_softmax(ft(ids).logits[0].double(), -1)
            for t in range(start - 1, ids.shape[1] - 1):  # positions predicting the completion and EOS
                kl_sum += float((lb[t].exp() * (lb[t] - lf[t])).sum())
                nll_sum -= float(lb[t, ids[0, t + 1]])
                n += 1
    assert measure.probe_kl(base, ft, tok, pairs) == pytest.approx(kl_sum / n, rel=1e-4)
    assert measure.dataset_nll(base, tok, pairs) == pytest.approx(nll_sum / n, rel=1e-5)
    assert measure.probe_kl(base, base, tok, pairs) == pytest.approx(0.0, abs=1e-7)
    assert torch.is_grad_enabled()  # the evaluation never leaks no_grad into the caller


def test_random_mask_like_keeps_every_tensor_count():
    from rlsparse.lab.runner import random_mask_like
    from rlsparse.masks import Mask

    gen = torch.Generator().manual_seed(0)
    mask = Mask.from_tensors({"a": torch.rand(7, 9, generator=gen) < 0.3, "b": torch.rand(13, generator=gen) < 0.8})
    rand = random_mask_like(mask, seed=3)
    assert {n: rand.count(n) for n in rand.names} == {n: mask.count(n) for n in mask.names}
    assert not torch.equal(rand.get("a"), mask.get("a"))
    assert torch.equal(random_mask_like(mask, seed=3).get("a"), rand.get("a"))


def test_clip_share_counts_steps_above_the_max_norm():
    from rlsparse.lab.runner import _clip_share

    history = [{"grad_norm": 0.5}, {"grad_norm": 1.5}, {"grad_norm": 1.0}, {"loss": 1.0}, {"grad_norm": 3.0}]
    assert _clip_share(history, 1.0) == 0.5
    assert _clip_share(history, 0.0) is None and _clip_share([], 1.0) is None


def test_net_drift_of_the_trace_by_hand():
    from rlsparse.lab.trace import sparsity_trace

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 1.0]]))
    cb = sparsity_trace(model, total_steps=3, points=3)

    class State:
        global_step = 0

    state = State()
    # weight 0 moves +0.5, +0.5, +0.5 (net 1.5, path 1.5); weight 1 moves +1, -1, +0.5 (net 0.5, path 2.5)
    for step, delta in enumerate(([0.5, 1.0], [0.5, -1.0], [0.5, 0.5]), 1):
        with torch.no_grad():
            model.weight += torch.tensor([delta])
        state.global_step = step
        cb.on_step_end(None, state, None)
    cb.on_train_end(None, state, None)
    assert cb.drift["net_over_path"] == pytest.approx((1.5 + 0.5) / (1.5 + 2.5))
    assert cb.drift["mean_ratio"] == pytest.approx((1.0 + 0.2) / 2)
    assert cb.drift["moved"] == 2


def test_net_drift_of_pure_bf16_weights_sums_the_path_in_fp32():
    """One-ULP steps of a bf16 weight: a path summed in bf16 would stop at 2.0 (where 2^-7 is half
    a spacing); summed in fp32 it is exact."""
    from rlsparse.lab.trace import sparsity_trace

    model = torch.nn.Linear(2, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 1.0]]))
    cb = sparsity_trace(model, total_steps=600, points=1)

    class State:
        global_step = 0

    state, ulp = State(), 2.0 ** -7  # bf16's spacing in [1, 2)
    # weight 0 goes up and back one ULP 300 times (net 0, path 600 ULPs); weight 1 moves one ULP once
    for step in range(1, 601):
        with torch.no_grad():
            model.weight += torch.tensor([[ulp if step % 2 else -ulp, ulp if step == 1 else 0.0]], dtype=torch.bfloat16)
        state.global_step = step
        cb.on_step_end(None, state, None)
    cb.on_train_end(None, state, None)
    assert model.weight.tolist() == [[1.0, 1.0 + ulp]]
    assert cb.drift["net_over_path"] == ulp / (600 * ulp + ulp)
    assert cb.drift["mean_ratio"] == (0.0 + 1.0) / 2
    assert cb.drift["moved"] == 2


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 9), points=st.integers(1, 5),
       weights=st.sampled_from([torch.float32, torch.bfloat16]), bucket=st.sampled_from([1 << 22, 20, 1]))
def test_checkpoint_series_of_the_trace_equal_a_brute_force_over_every_step(seed, steps, points, weights, bucket):
    """Figures 2, 6 and 7(b) and both sparsity views from the trace equal counting on a bf16 copy
    saved after every step (fp32 master weights, and pure bf16 weights the optimizer moves in place;
    the parameters traced as one flat bucket, or split into several)."""
    from rlsparse.lab import trace

    old = trace.BUCKET_ELEMENTS
    trace.BUCKET_ELEMENTS = bucket
    try:
        _check_series_against_brute_force(seed, steps, points, weights)
    finally:
        trace.BUCKET_ELEMENTS = old


def _check_series_against_brute_force(seed, steps, points, weights):
    from rlsparse.lab.trace import sparsity_trace

    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3, bias=False)).to(weights)
    with torch.no_grad():
        for p in model.parameters():  # bf16 values, as a model loaded from a bf16 checkpoint holds
            p.copy_(torch.randn(p.shape, generator=gen).to(torch.bfloat16).to(weights))
    cb = sparsity_trace(model, total_steps=steps, points=points)
    first = [p.detach().clone() for p in model.parameters()]

    def bf16_all():
        return torch.cat([p.detach().to(torch.bfloat16).float().ravel() for p in model.parameters()])

    def exact_all():
        return torch.cat([p.detach().clone().ravel() for p in model.parameters()])

    saved, exact = [bf16_all()], [exact_all()]
    # the path length per tensor, accumulated in fp32 whatever the weights' dtype
    walked = [torch.zeros(p.shape) for p in model.parameters()]

    class State:
        global_step = 0

    state = State()
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), first):
                # a few weights move a lot, some a little (under 1e-5 or under bf16's spacing), some back
                size = torch.where(torch.rand(p.shape, generator=gen) < 0.3, 0.05, 1e-6)
                hit = torch.rand(p.shape, generator=gen) < 0.5
                p += torch.where(hit, size * torch.randn(p.shape, generator=gen), torch.zeros(p.shape)).to(weights)
                if step == steps:  # some weights return exactly to where they started: cancelled
                    back = torch.rand(p.shape, generator=gen) < 0.2
                    p.copy_(torch.where(back, p0, p.detach()))
        state.global_step = step
        cb.on_step_end(None, state, None)
        for w, p, before in zip(walked, model.parameters(), exact[-1].split([q.numel() for q in walked])):
            w += (p.detach().float() - before.view(p.shape).float()).abs()
        saved.append(bf16_all())
        exact.append(exact_all())
    cb.on_train_end(None, state, None)
    s = cb.series
    changed = [(x - saved[0]).abs() > 1e-5 for x in saved]
    assert cb.trace[0]["step"] == 0 and cb.trace[-1]["step"] == steps
    for t in cb.trace:  # the bf16 view (a checkpoint saved then) and the fp32 view (master weights moved at all)
        assert t["bf16"] == 1 - int(changed[t["step"]].sum()) / saved[0].numel()
        assert t["fp32"] == 1 - int((exact[t["step"]] != exact[0]).sum()) / saved[0].numel()
    ever = torch.stack(changed[1:]).any(0)
    final = changed[-1]
    assert s["numel"] == saved[0].numel()
    assert (s["ever"], s["final"], s["cancelled"], s["never"]) == (
        int(ever.sum()), int(final.sum()), int((ever & ~final).sum()), int((~ever).sum()))
    assert s["never"] + s["cancelled"] + s["final"] == s["numel"]
    # the net-drift ratio, summed tensor by tensor in float64: the same floats, bit for bit
    net_sum = path_sum = ratio_sum = 0.0
    moved = 0
    for p, p0, w in zip(model.parameters(), first, walked):
        net, walk = (p.detach().float() - p0.float()).abs().double(), w.double()
        net_sum, path_sum = net_sum + float(net.sum()), path_sum + float(walk.sum())
        moved += int((walk > 0).sum())
        ratio_sum += float((net[walk > 0] / walk[walk > 0]).sum())
    assert cb.drift["moved"] == moved
    if moved:
        assert (cb.drift["net_over_path"], cb.drift["mean_ratio"]) == (net_sum / path_sum, ratio_sum / moved)
    assert [d["step"] for d in s["per_step"]] == list(range(1, steps + 1))
    for d in s["per_step"]:
        assert d["share"] == int(((saved[d["step"]] - saved[d["step"] - 1]).abs() > 1e-5).sum()) / s["numel"]
    assert [d["step"] for d in s["outside_final"]] == [t["step"] for t in cb.trace[1:]]
    for d in s["outside_final"]:
        assert d["share"] == int((changed[d["step"]] & ~final).sum()) / s["numel"]


def test_table5_control_data_vary_only_the_targets():
    problems = split("add", seed=0, n_test=6)[1]
    samples = [[p.answer, "1", p.answer] if i % 2 else ["7", "8"] for i, p in enumerate(problems)]
    policy = labdata.policy_pairs(problems, samples)
    rand = labdata.random_rejected_pairs(problems, samples, seed=0)
    # the same problems keep a pair in both, with the same chosen answer; only the rejected side differs
    assert [r["prompt"] for r in rand] == [p.prompt for i, p in enumerate(problems) if i % 2]
    assert [r["chosen"] for r in rand] == [p.answer for i, p in enumerate(problems) if i % 2]
    assert [r["prompt"] for r in policy] == [r["prompt"] for r in rand]
    assert all(r["rejected"] != r["chosen"] and len(r["rejected"]) == len(r["chosen"]) for r in rand)
    fmt = labdata.format_pairs(problems, samples)
    assert [(r["chosen"], r["rejected"]) for r in fmt] == [(r["chosen"][::-1], r["rejected"][::-1]) for r in policy]


def test_subnetwork_overlaps_count_a_known_intersection(tiny_base, tmp_path):
    name = "model.layers.1.self_attn.q_proj.weight"

    def bump(indices):
        def edit(n, t):
            if n == name:
                t.view(-1)[indices] += 1.0
            return t
        return edit

    _copy(tiny_base, tmp_path / "a", bump([0, 1, 2, 3]))
    _copy(tiny_base, tmp_path / "b", bump([2, 3, 4]))
    numel = sum(t.numel() for t in load_file(str(tiny_base / "model.safetensors")).values())
    ov = overlaps.subnetwork_overlaps(tiny_base, [tmp_path / "a", tmp_path / "b"], [(0, 1)])[0]
    assert ov["o1"] == 2 / 4 and ov["o2"] == 2 / 3
    assert ov["o1_random"] == pytest.approx(3 / numel) and ov["o2_random"] == pytest.approx(4 / numel)
