"""bench/bench_sync_grpo.py's recording on a tiny GRPO run: every sync it records is checked exactly."""

from __future__ import annotations

import argparse
import importlib.util
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from deltahelpers import bits_of

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_sync_grpo.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sync_grpo", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _length_reward(completions, **kwargs):
    return [min(1.0, len(str(c)) / 20) for c in completions]


def _bf16_file(folder: Path) -> dict:
    return {n: bits_of(t) for n, t in load_file(folder / "model.safetensors").items()}


def test_grpo_sync_records_match_the_saved_checkpoints(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    from rlsparse.delta import DeltaSyncCallback
    from rlsparse.delta.sync import snapshot
    from rlsparse.delta.transport import FileTransport
    from rlsparse.lab.base import save_model
    from rlsparse.train.trainers import build_trainer
    from trainhelpers import make_model, make_tokenizer

    bench = _bench()
    out = tmp_path / "run"
    model, tok = make_model(torch.float32), make_tokenizer()
    save_model(model, tok, out / "ckpt" / "step-0", dtype="bfloat16")
    receiver = {n: t.clone() for n, t in snapshot(model, "bf16").items()}
    sync = DeltaSyncCallback(FileTransport(out / "sync"), every=1, chunk_elements=1024)
    recorder = bench.recorder(out, out / "sync", receiver, tok)(sync)
    config = GRPOConfig(output_dir=str(tmp_path / "trl"), max_steps=3, per_device_train_batch_size=4,
                        num_generations=2, max_completion_length=4, beta=0.0, learning_rate=1e-3,
                        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1)
    data = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "what is 1 plus 2", "w9 w10 w11"], "answer": ["3"] * 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_trainer("grpo", model, config, data, tok, reward_funcs=[_length_reward],
                      callbacks=[sync, recorder]).train()

    records = [json.loads(ln) for ln in (out / "sync.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    payloads = sorted((out / "sync").glob("sync-*.rlpatch"))
    for k, (rec, payload) in enumerate(zip(records, payloads), 1):
        assert rec["receiver_bit_identical"] is True
        assert rec["bytes_sent"] == rec["payload_len"] == rec["received_bytes"] == payload.stat().st_size
        before, after = _bf16_file(out / "ckpt" / f"step-{k - 1}"), _bf16_file(out / "ckpt" / f"step-{k}")
        brute = sum(int((after[n] != before[n]).sum()) for n in after)
        assert rec["changed"] == rec["received_changed"] == brute
        assert rec["full_bf16_bytes"] == 2 * sum(t.numel() for t in after.values())
    assert sum(r["changed"] for r in records) > 0  # lr 1e-3 moves bf16 weights: the check above saw changes
    final = _bf16_file(out / "ckpt" / "step-3")
    assert all(torch.equal(bits_of(receiver[n]), bits) for n, bits in final.items())

    # The baselines phase packs the saved checkpoints and must count the same changes.
    bench.baselines(argparse.Namespace(out=str(out), workers=1))
    rows = [json.loads(ln) for ln in (out / "baselines.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row, rec in zip(rows, records):
        assert row["changed"] == rec["changed"] and row["index_value_bytes"] == 6 * rec["changed"]
    joined = bench.report(argparse.Namespace(out=str(out), json=str(tmp_path / "sync.json")))
    assert [r["sync_changed_equals_file_changed"] for r in joined["steps"]] == [True] * 3
