"""Per-step sparse weight sync on a real GRPO run, beside the baselines, in one script.

A real GRPO run (TRL's ``GRPOTrainer`` through ``rlsparse.train.trainers.build_trainer``) on a bf16
base with fp32 master weights: chat-template 2-digit addition prompts (``rlsparse.lab.tasks``),
exact-answer reward on the reply's last number. ``rlsparse.delta.DeltaSyncCallback`` syncs after
EVERY optimizer step over a ``FileTransport``; an in-process ``SyncReceiver`` holding its own bf16
copy (read from the base's safetensors file) receives each payload, and the script checks that its
copy is bit-identical to what the sender holds. Each step's weights are also saved as a bf16
checkpoint, so the ``baselines`` phase can pack step k-1 -> k with ``bench/bench_delta.py``'s
baselines: zstd -9 of the XOR, int32 index + bf16 value, the order-0 bound, and our own file patch.

Everything is written as it happens (``OUT/sync.jsonl`` per step, ``OUT/log.jsonl`` per logged
step, ``OUT/ckpt/step-K``, ``OUT/baselines.jsonl`` per pair), so a killed run loses nothing
measured; ``--phase baselines`` (or ``report``) resumes from what is on disk.

    python bench/bench_sync_grpo.py --base /work/labcache/real-smollm2-135m-* --out /tmp/delta-real-grpo \\
        --lr 1e-6 --steps 10                 # train + sync, then baselines, then the table
    python bench/bench_sync_grpo.py --out /tmp/delta-real-grpo --phase report --json sync.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 1


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _append(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def recorder(out: Path, transport_folder: Path, receiver_sd: dict, tokenizer):
    """A TrainerCallback that receives each sync, checks the receiver, saves the step's bf16 checkpoint."""
    import torch
    from transformers import TrainerCallback

    from rlsparse.delta import SyncReceiver
    from rlsparse.delta.sync import snapshot
    from rlsparse.delta.transport import FileTransport
    from rlsparse.lab.base import save_model

    class Recorder(TrainerCallback):
        def __init__(self, sync_cb):
            self.sync_cb = sync_cb
            self.inbox = FileTransport(transport_folder)
            self.receiver = SyncReceiver(receiver_sd)
            self.t_step = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.t_step = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            sent = self.sync_cb.reports[-1]
            payload = self.inbox.receive(timeout=60)
            got = self.receiver.receive(payload)
            # Checked against the trainer's own weights cast to bf16 now, not the sender's copy.
            held = snapshot(model, "bf16")
            # Bit-identical: compare the stored bits, not values (NaN, -0.0).
            same = set(held) == set(receiver_sd) and all(
                torch.equal(held[n].view(torch.int16) if held[n].dtype == torch.bfloat16 else held[n],
                            receiver_sd[n].view(torch.int16) if receiver_sd[n].dtype == torch.bfloat16
                            else receiver_sd[n]) for n in held)
            t_save = time.perf_counter()
            save_model(model, tokenizer, out / "ckpt" / f"step-{state.global_step}", dtype="bfloat16")
            rec = {**sent.to_json(), "payload_len": len(payload), "received_bytes": got.bytes_sent,
                   "received_changed": got.changed, "decode_seconds": got.decode_seconds,
                   "receiver_bit_identical": bool(same), "save_seconds": time.perf_counter() - t_save,
                   "step_seconds": t_save - self.t_step, "loadavg": os.getloadavg()}
            _append(out / "sync.jsonl", rec)
            print(f"step {state.global_step}: changed {sent.changed:,} ({sent.density:.4%}), sent "
                  f"{sent.bytes_sent / 1e6:.3f} MB = 1/{sent.ratio:.0f} of bf16, encode {sent.encode_seconds:.1f} s, "
                  f"decode {got.decode_seconds:.1f} s, identical {same}, step {rec['step_seconds']:.0f} s",
                  flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            _append(out / "log.jsonl", {"step": state.global_step, **(logs or {})})

    return Recorder


def train(args) -> None:
    """Train GRPO with a sync after every step; every step's record is on disk when the step ends."""
    import warnings

    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import set_seed
    from trl import GRPOConfig

    from rlsparse.delta import DeltaSyncCallback
    from rlsparse.delta.transport import FileTransport
    from rlsparse.lab import data as labdata
    from rlsparse.lab.base import load_model
    from rlsparse.lab.tasks import reward, split
    from rlsparse.train.trainers import build_trainer

    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6.*", category=FutureWarning)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if (out / "sync.jsonl").exists():
        sys.exit(f"error: {out} already holds a training run (sync.jsonl); use --phase baselines/report, "
                 "or pick a new --out")
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base)
    (out / "run.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, **vars(args),
                                              "base": str(base.resolve())}, indent=2))
    set_seed(args.seed)
    model, tok = load_model(base, "cpu", weights="float32")
    train_set, _ = split("add", seed=args.seed, n_test=400, digits=2, style="chat")
    rows = labdata.grpo_rows(train_set[:args.n_train])
    config = GRPOConfig(output_dir=str(out / "trl"), learning_rate=args.lr, max_steps=args.steps,
                        per_device_train_batch_size=args.prompts * args.generations,
                        gradient_accumulation_steps=1, num_generations=args.generations,
                        max_completion_length=args.max_completion_length, temperature=args.temperature,
                        beta=args.beta, loss_type="grpo", epsilon=0.2, max_grad_norm=1.0,
                        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1,
                        save_strategy="no", report_to="none", seed=args.seed, data_seed=args.seed, use_cpu=True,
                        bf16=False, disable_tqdm=True, dataloader_num_workers=0, log_completions=False)
    # The receiver's copy comes from the base file, not from the trainer's model: an independent replica.
    receiver_sd = {}
    for f in sorted(base.glob("*.safetensors")):
        receiver_sd.update(load_file(f))
    sync = DeltaSyncCallback(FileTransport(out / "sync"), every=1, dtype="bf16", workers=args.workers)
    record = recorder(out, out / "sync", receiver_sd, tok)(sync)
    trainer = build_trainer("grpo", model, config, Dataset.from_list(rows), tok, reward_funcs=[reward],
                            callbacks=[sync, record])
    (out / "ckpt").mkdir(exist_ok=True)
    link = out / "ckpt" / "step-0"
    if not link.exists():
        link.symlink_to(base.resolve())
    t0 = time.perf_counter()
    trainer.train()
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)


def baselines(args) -> None:
    """Pack every saved step k-1 -> k and measure the baselines (each tool in its own child process)."""
    sys.path.insert(0, str(HERE))
    from bench_delta import PACK, XOR_ZSTD, run_child

    out = Path(args.out)
    done = {r["step"] for r in _jsonl(out / "baselines.jsonl")}
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "ckpt").glob("step-*"))
    for k in steps:
        if k == 0 or k in done or (k - 1) not in steps:
            continue
        a, b = str(out / "ckpt" / f"step-{k - 1}"), str(out / "ckpt" / f"step-{k}")
        patch = out / "baseline.rlpatch"
        _, _, packed = run_child(PACK.format(base=a, ft=b, out=str(patch), hist=True, workers=args.workers,
                                             parallel="auto"))
        _, _, xor = run_child(XOR_ZSTD.format(base=a, ft=b))
        patch.unlink(missing_ok=True)
        rec = {"step": k, "changed": packed["changed"], "numel": packed["numel"], "file_patch_bytes": packed["bytes"],
               "order0_bound_bytes": packed["bound"], "zstd9_xor_bytes": xor["bytes"], "zstd9_xor_s": xor["seconds"],
               "index_value_bytes": 6 * packed["changed"], "loadavg": os.getloadavg()}
        _append(out / "baselines.jsonl", rec)
        print(f"baselines step {k - 1} -> {k}: changed {rec['changed']:,}, zstd-9 XOR {rec['zstd9_xor_bytes'] / 1e6:.2f} MB, "
              f"idx+val {rec['index_value_bytes'] / 1e6:.2f} MB, order-0 {rec['order0_bound_bytes'] / 1e6:.3f} MB",
              flush=True)


def report(args) -> dict:
    """Join sync, baselines and the trainer's logs per step; print the table; return the JSON."""
    from rich.console import Console
    from rich.table import Table

    out = Path(args.out)
    syncs = {r["step"]: r for r in _jsonl(out / "sync.jsonl")}
    bases = {r["step"]: r for r in _jsonl(out / "baselines.jsonl")}
    logs = {r["step"]: r for r in _jsonl(out / "log.jsonl") if "loss" in r or "reward" in r}
    rows = []
    for k in sorted(syncs):
        s, b, lg = syncs[k], bases.get(k, {}), logs.get(k, {})
        rows.append({**s, "baselines": b, "reward": lg.get("reward"), "reward_std": lg.get("reward_std"),
                     "frac_reward_zero_std": lg.get("frac_reward_zero_std"),
                     "sync_changed_equals_file_changed": (b.get("changed") == s["changed"]) if b else None,
                     "ours_vs_bound": s["bytes_sent"] / b["order0_bound_bytes"] if b else None})
    t = Table(title=f"Per-step sync on {out} (sizes in MB; bf16 broadcast = 2 bytes x elements)")
    for col in ("step", "reward (std)", "changed", "sent", "x vs bf16", "zstd-9 XOR", "idx+val", "order-0",
                "sent/bound", "encode s", "decode s", "bit-identical", "load"):
        t.add_column(col, justify="right")
    for r in rows:
        b = r["baselines"]
        f = (lambda key: f"{b[key] / 1e6:.3f}" if b else "-")
        t.add_row(str(r["step"]), "-" if r["reward"] is None else f"{r['reward']:.3f} ({r['reward_std']:.3f})",
                  f"{r['changed']:,} ({r['density']:.3%})", f"{r['bytes_sent'] / 1e6:.3f}", f"{r['ratio']:.0f}",
                  f("zstd9_xor_bytes"), f("index_value_bytes"), f("order0_bound_bytes"),
                  "-" if r["ours_vs_bound"] is None else f"{r['ours_vs_bound']:.3f}",
                  f"{r['encode_seconds']:.1f}", f"{r['decode_seconds']:.1f}",
                  "yes" if r["receiver_bit_identical"] else "NO", f"{r['loadavg'][0]:.1f}")
    Console(width=220).print(t)
    if rows:
        ratios = [r["ratio"] for r in rows]
        print(f"{len(rows)} syncs: bytes per sync 1/{min(ratios):.0f} to 1/{max(ratios):.0f} of a full bf16 "
              f"broadcast; every receiver copy bit-identical: {all(r['receiver_bit_identical'] for r in rows)}")
    result = {"schema_version": SCHEMA_VERSION, "run": json.loads((out / "run.json").read_text())
              if (out / "run.json").is_file() else None, "steps": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--base", default="/work/labcache/real-smollm2-135m-b179c9523d0e", help="bf16 HF base folder")
    ap.add_argument("--out", required=True, help="run folder (sync.jsonl, log.jsonl, ckpt/, baselines.jsonl)")
    ap.add_argument("--phase", choices=("all", "train", "baselines", "report"), default="all")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per optimizer step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt (GRPO group)")
    ap.add_argument("--max-completion-length", type=int, default=12)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--beta", type=float, default=0.0, help="KL weight (0 skips the reference model)")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--workers", type=int, default=2, help="delta coding threads")
    ap.add_argument("--json", metavar="PATH", help="write the joined per-step results here")
    args = ap.parse_args(argv)
    if args.phase in ("all", "train"):
        train(args)
    if args.phase in ("all", "baselines"):
        baselines(args)
    if args.phase in ("all", "report", "baselines"):
        report(args)


if __name__ == "__main__":
    main()
