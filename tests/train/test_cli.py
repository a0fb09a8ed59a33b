"""`rlsparse train ALGO`: end to end on a tiny model folder, and bad input failing early."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from trainhelpers import int_view, make_model, make_tokenizer, random_mask
from rlsparse.cli import train_cmd
from rlsparse.errors import MaskError, UsageError
from rlsparse.train.trainers import ALGORITHMS


@pytest.fixture
def base(tmp_path):
    model, tok = make_model(), make_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    random_mask(model).save(tmp_path / "sub.mask.safetensors")
    rows = [{"prompt": "w1 w2", "completion": " w3 w4", "answer": "3"}, {"prompt": "w5", "completion": " w6",
                                                                          "answer": "3"}] * 2
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path


def _cli(argv):
    top = argparse.ArgumentParser(prog="rlsparse")
    train_cmd.add_parser(top.add_subparsers(dest="command"))
    args = top.parse_args(argv)
    return args.func(args)


COMMON = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
          "--learning_rate", "1e-2", "--use_cpu", "--disable_tqdm", "true"]


def test_algorithm_names_match_the_library():
    assert set(train_cmd.ALGORITHM_NAMES) == set(ALGORITHMS)


def test_sft_with_mask_end_to_end(base):
    out = base / "out"
    code = _cli(["train", "sft", "--model", str(base / "base"), "--dataset", str(base / "data.jsonl"),
                 "--mask", str(base / "sub.mask.safetensors"), "--output_dir", str(out), "--verify", *COMMON])
    assert code == 0 and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    from safetensors.torch import load_file

    from rlsparse.masks import Mask

    start = load_file(str(base / "base" / "model.safetensors"))
    end = load_file(str(out / "model.safetensors"))
    mask = Mask.load(base / "sub.mask.safetensors")
    for name, before in start.items():
        keep = ~mask.get(name)
        assert torch.equal(int_view(before)[keep], int_view(end[name])[keep]), name


def test_grpo_with_builtin_reward_and_simpo_defaults(base):
    code = _cli(["train", "grpo", "--model", str(base / "base"), "--dataset", str(base / "data.jsonl"),
                 "--reward", "exact_answer", "--num_generations", "2", "--max_completion_length", "3",
                 "--output_dir", str(base / "grpo"), *COMMON])
    assert code == 0 and (base / "grpo" / "model.safetensors").is_file()
    _, config = train_cmd.make_parser("simpo").parse_args_and_config(
        ["--model", "m", "--dataset", "d", "--output_dir", str(base / "x"), "--use_cpu"])
    assert config.loss_type == "simpo" and config.cpo_alpha == 0.0


def test_not_a_mask_fails_before_training(base):
    (base / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(MaskError):
        _cli(["train", "sft", "--model", str(base / "base"), "--dataset", str(base / "data.jsonl"),
              "--mask", str(base / "junk.safetensors"), "--output_dir", str(base / "out"), *COMMON])
    assert not (base / "out").exists()


def test_bad_options_fail_with_usage_errors(base):
    argv = ["--model", str(base / "base"), "--output_dir", str(base / "out"), *COMMON]
    with pytest.raises(UsageError, match="no such file"):
        _cli(["train", "sft", "--dataset", str(base / "missing.jsonl"), *argv])
    with pytest.raises(UsageError, match="needs a reward"):
        _cli(["train", "rloo", "--dataset", str(base / "data.jsonl"), *argv])
    with pytest.raises(UsageError, match="mask_order"):
        _cli(["train", "sft", "--dataset", str(base / "data.jsonl"), "--mask_order", "never", *argv])


@pytest.mark.parametrize("algo", ["ppo", "prime"])
def test_ppo_and_prime_from_the_cli_on_a_prompt_answer_dataset(tmp_path, algo):
    model, tok = make_model(), make_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    random_mask(model).save(tmp_path / "sub.mask.safetensors")
    rows = [{"prompt": "what is 1 plus 2", "answer": "3"}, {"prompt": "w1 w2", "answer": "w3"}] * 2
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / algo
    code = _cli(["train", algo, "--model", str(tmp_path / "base"), "--dataset", str(tmp_path / "data.jsonl"),
                 "--reward", "exact_answer", "--num_generations", "2", "--max_completion_length", "3",
                 "--mask", str(tmp_path / "sub.mask.safetensors"), "--verify", "--output_dir", str(out), *COMMON])
    assert code == 0 and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    with pytest.raises(UsageError, match="needs a reward"):
        _cli(["train", algo, "--model", str(tmp_path / "base"), "--dataset", str(tmp_path / "data.jsonl"),
              "--output_dir", str(tmp_path / "x"), *COMMON])
