"""Evaluation and measurement speed-ups that must not change a result: the shared-prefix cache in
greedy evaluation, thread settings and the one-thread SVD scope."""

import os

import pytest
import torch

from rlsparse.analysis.rank import one_thread
from rlsparse.errors import UsageError
from rlsparse.lab.base import _prefix_cached, greedy_answers, load_model
from rlsparse.lab.recipes import load_suite
from rlsparse.lab.runner import LabOptions, apply_suite, resolve_threads
from rlsparse.lab.tasks import Problem, encode_prompts, split

PREFIX = "what is the sum? "  # every character is in the tiny tokenizer's alphabet


def _noisy_model(tiny_base):
    """The tiny base with seeded noise on every weight: long, varied greedy replies (not just EOS)."""
    model, tok = load_model(tiny_base)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(3.0 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return model, tok


def _problems() -> list[Problem]:
    # A shared prefix, then a tail whose length varies (0-2 spaces): batches hold left padding.
    return [Problem(prompt=PREFIX + " " * (i % 3) + p.prompt, answer=p.answer, family="add")
            for i, p in enumerate(split("add", seed=0, n_test=40)[1])]


def test_shared_prefix_cache_gives_the_plain_greedy_answers(tiny_base):
    model, tok = _noisy_model(tiny_base)
    problems = _problems()
    enc = encode_prompts(problems[:16], tok)
    moved = _prefix_cached(model, enc, tok.pad_token_id)
    # the cache path is taken: the prefix (17 characters, one token each) is cached once for the batch
    assert moved is not None and moved.get("cache", moved.get("past_key_values")).get_seq_length() == len(PREFIX)
    assert int(moved["attention_mask"].sum()) == int(enc["attention_mask"].sum())
    plain = greedy_answers(model, tok, problems, batch_size=16, max_new_tokens=6, shared_prefix=False)
    cached = greedy_answers(model, tok, problems, batch_size=16, max_new_tokens=6, shared_prefix=True)
    one_by_one = greedy_answers(model, tok, problems, batch_size=1, max_new_tokens=6, shared_prefix=False)
    assert cached == plain == one_by_one
    assert len(set(plain)) > 30  # varied 6-token replies, not a constant: the comparison can fail


def test_no_shared_prefix_falls_back_to_the_plain_path(tiny_base):
    model, tok = load_model(tiny_base)
    problems = split("add", seed=0, n_test=40)[1]  # "12+34=": no 8-token shared prefix
    assert _prefix_cached(model, encode_prompts(problems[:8], tok), tok.pad_token_id) is None
    assert (greedy_answers(model, tok, problems, 8, 6, shared_prefix=True)
            == greedy_answers(model, tok, problems, 8, 6, shared_prefix=False))


def test_threads_auto_is_the_cores_this_process_may_use():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert resolve_threads("auto") == min(cores, 16)
    assert resolve_threads(3) == 3 and resolve_threads(None) == 1
    for bad in (0, -1, "two", 1.5):
        with pytest.raises(UsageError, match="positive integer or 'auto'"):
            resolve_threads(bad)


def test_real_suite_defaults_to_auto_threads_and_an_explicit_count_wins():
    assert load_suite("real").threads == "auto"
    opts = LabOptions(out=None, quick=True)
    apply_suite(opts, load_suite("real"))
    assert opts.threads == "auto"
    pinned = LabOptions(out=None, quick=True, threads=1)
    apply_suite(pinned, load_suite("real"))
    assert pinned.threads == 1


def test_one_thread_scope_restores_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
