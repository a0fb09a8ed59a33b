"""Cost per training step of every lab algorithm, and where PPO's and PRIME's steps spend it.

Tiny base (default): each built-in recipe at its own batch settings, ``--steps`` steps at
learning rate 1e-5 through the lab runner (``train.trainers``), one torch thread (the lab's
default). Seconds per step are the trainer's ``train()`` wall time over the step count; for PPO
and PRIME the process CPU time is also split into sampling, scoring the rollout (reward, no-grad
forwards, advantages; PRIME's PRM forward, backward and step), and the policy / value updates.

Real base (``--model FOLDER``): one PPO and one PRIME rollout-and-update on a local HF model
(e.g. the lab's bf16 SmolLM2-135M folder) with chat-template 2-digit addition prompts and the
exact-answer reward, ``--threads`` torch threads.

    python bench/bench_algorithms.py [--steps 6] [--json out.json]
    python bench/bench_algorithms.py --model /path/to/real-smollm2-135m --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

PHASES = ("generate", "score_rollout", "value_update", "step_total")


def _instrument(trainer) -> dict:
    """Wrap the trainer's phases with timers; returns running totals of process CPU seconds.

    CPU seconds (all threads of this process) rather than wall-clock: on a shared machine the
    wall clock measures the other users' load as much as this code.
    """
    totals = dict.fromkeys(PHASES, 0.0)

    def timed(name, func):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return func(*args, **kwargs)
            finally:
                totals[name] += time.process_time() - start
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._score_rollout = timed("score_rollout", trainer._score_rollout)
    if hasattr(trainer, "_update_value"):
        trainer._update_value = timed("value_update", trainer._update_value)
    trainer.training_step = timed("step_total", trainer.training_step)
    return totals


def _split(totals: dict, steps: int) -> dict:
    rollout = totals["generate"] + totals["score_rollout"]
    policy = totals["step_total"] - rollout - totals["value_update"]
    return {"generate": totals["generate"] / steps, "score_rollout": totals["score_rollout"] / steps,
            "policy_update": policy / steps, "value_update": totals["value_update"] / steps}


def tiny(steps: int, cache: str | None) -> list[dict]:
    import torch

    from rlsparse.lab import runner
    from rlsparse.lab.base import ensure_base
    from rlsparse.lab.recipes import load_recipe, recipe_names
    from rlsparse.train import trainers

    torch.set_num_threads(1)
    runner._quiet()
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="rlsparse-bench-") as tmp:
        opts = runner.LabOptions(out=Path(tmp), n_test=50)
        run = runner._Run(opts, print)
        run.base_path = ensure_base(opts.base, cache)
        build = trainers.build_trainer
        for name in recipe_names():
            recipe = dataclasses.replace(load_recipe(name), steps=steps, n_train=400, learning_rates=[1e-5])
            data = runner.build_rows(run, recipe)
            phases = {}

            def instrumented(*args, **kwargs):
                trainer = build(*args, **kwargs)
                if hasattr(trainer, "_score_rollout"):
                    phases["totals"] = _instrument(trainer)
                return trainer

            trainers.build_trainer = instrumented
            start = time.process_time()
            try:
                result = runner.train_one(run, recipe, 1e-5, data, Path(tmp) / name)
            finally:
                trainers.build_trainer = build
            cpu = time.process_time() - start  # includes loading, saving and the accuracy evaluation
            row = {"recipe": name, "algorithm": recipe.algorithm, "trainer": result["trainer"],
                   "batch": recipe.batch_size, "steps": steps, "seconds_per_step": result["seconds"] / steps,
                   "cpu_seconds_train_one": cpu}
            if "totals" in phases:
                row["phases_cpu_seconds"] = _split(phases["totals"], steps)
            rows_out.append(row)
            print(f"{name:18s} {result['trainer']:14s} {row['seconds_per_step']:.3f} s/step (wall), "
                  f"train_one {cpu:.1f} CPU s"
                  + (f"; per step, CPU s: {_fmt(row['phases_cpu_seconds'])}" if "phases_cpu_seconds" in row else ""),
                  flush=True)
    return rows_out


def real(model_path: str, threads: int, compute: str) -> list[dict]:
    import random
    import warnings

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsparse.train.ppo import PPOConfig
    from rlsparse.train.prime import PRIMEConfig
    from rlsparse.train.rewards import exact_answer
    from rlsparse.train.trainers import build_trainer

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    rng = random.Random(0)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(16)]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with just the number."}],
                               "answer": str(a + b)} for a, b in pairs])
    common = dict(max_steps=1, max_completion_length=24, learning_rate=1e-6, report_to="none", save_strategy="no",
                  use_cpu=True, disable_tqdm=True, bf16=compute == "bfloat16", logging_steps=1, seed=0)
    setups = {"ppo": PPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, num_generations=1,
                               num_ppo_epochs=1, kl_coef=0.05, **common),
              "prime": PRIMEConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, num_generations=4,
                                   prm_learning_rate=1e-6, **common)}
    out = []
    for name, config in setups.items():
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        trainer = build_trainer(name, model, config, data, tok, reward_funcs=[exact_answer])
        setup = time.perf_counter() - start
        totals = _instrument(trainer)
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        log = trainer.state.log_history[0]
        row = {"algorithm": name, "samples": config.per_device_train_batch_size * config.num_generations,
               "max_completion_length": config.max_completion_length, "compute": compute, "threads": threads,
               "setup_seconds": setup, "seconds_per_step": seconds, "cpu_seconds_per_step": cpu,
               "phases_cpu_seconds": _split(totals, 1),
               "completion_length": log.get("completion_length"), "reward": log.get("reward")}
        out.append(row)
        print(f"{name}: {seconds:.1f} s/step wall, {cpu:.1f} CPU s ({row['samples']} samples x <= "
              f"{config.max_completion_length} tokens, mean length {row['completion_length']}, reward "
              f"{row['reward']}); setup {setup:.1f} s; CPU s: {_fmt(row['phases_cpu_seconds'])}", flush=True)
        del trainer, model
    return out


def _fmt(phases: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in phases.items())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", help="a local HF model folder: time PPO and PRIME on it instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compute", choices=("bfloat16", "float32"), default="bfloat16",
                        help="real base: bf16 autocast over fp32 weights (the lab's default on CPUs with bf16) or fp32")
    parser.add_argument("--cache", help="lab cache folder for the tiny base")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args(argv)
    rows = real(args.model, args.threads, args.compute) if args.model else tiny(args.steps, args.cache)
    if args.json:
        Path(args.json).write_text(json.dumps({"schema_version": 1, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
