"""The one runner: builds each recipe's data, trains it with TRL over its learning-rate sweep,
saves bf16 (or fp32) HF checkpoints, measures sparsity/rank/accuracy, and runs the
Conjecture 1 subnetwork rerun.

Run folder layout::

    RUN_DIR/run.json                       what was run: recipes, seeds, base, precision, versions
    RUN_DIR/results.json                   every measurement (the report reads only this)
    RUN_DIR/runs/<recipe>/lr-<lr>[-seedN]/ HF checkpoint of one finetune (+ metrics.json, written last)
    RUN_DIR/conjecture/<recipe>/           the Conjecture 1 models, masks and result.json (written last)
    RUN_DIR/base_accuracy.json, samples/   the base's held-out accuracy and policy samples (reused on resume)
    RUN_DIR/base                           link to the model every run started from (the cached tiny base)
    RUN_DIR/report.html, report.md, figures/*.png
"""

from __future__ import annotations

import json
import os
import math
import platform
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rlsparse.errors import OutputError, UsageError, require
from rlsparse.io.atomic import write_json
from rlsparse.lab import class_weights as kto_class_weights
from rlsparse.lab import data as labdata
from rlsparse.lab import measure
from rlsparse.lab import trained as trained_record
from rlsparse.lab.base import BaseConfig, accuracy, base_metadata, ensure_base, load_model, save_model
from rlsparse.lab.cost import signal_steps
from rlsparse.lab.overlaps import subnetwork_overlaps
from rlsparse.lab.preregistration import Preregistration, load_preregistration
from rlsparse.lab.recipes import Recipe, cell_fields, load_recipe, load_suite, recipe_dir, recipe_names
from rlsparse.lab.tasks import Problem, load_jsonl, prompt_texts, reward, split
from rlsparse.lab.trace import sparsity_trace
from rlsparse.report.progress import training_progress

RUN_SCHEMA_VERSION = 1
DEMO_RECIPES = ("sft_ood", "sft_id", "rft", "dpo_id", "dpo_ood", "grpo", "grpo_nokl", "grpo_noclip",
                "grpo_nokl_noclip")


@dataclass
class LabOptions:
    """Options shared by every recipe of one lab run.

    Attributes:
        out: The run folder.
        model: An HF causal LM folder to start from; None builds/reuses the cached tiny base.
        device: "cpu" or "cuda".
        dataset: Optional local JSONL (prompt/answer) replacing the synthetic task data.
        quick: Apply each recipe's ``quick`` overrides (smoke runs, the demo).
        checkpoint_dtype: "bfloat16" (the paper's setting) or "float32".
        compute: "auto" (bfloat16 autocast where the device computes bf16 natively: CUDA with bf16,
            or a CPU with AVX512-BF16/AMX; else float32), "bfloat16" or "float32".
        weights: "float32" master weights (real post-training) or "bfloat16" (pure bf16 training).
        base: Config of the tiny base (used when ``model`` is None).
        cache_dir: Where cached bases live (default ``~/.cache/rlsparse/lab``).
        eval_family: The task whose held-out accuracy is "the task" (the base's own task).
        n_test: Held-out problems per family (at most the tiny base's own held-out split).
        conjecture: Run the Conjecture 1 reruns for recipes that ask for them.
        report: Render the report at the end.
        max_new_tokens: Answer length budget for evaluation and policy sampling (raise it for real data;
            GRPO's own budget is the recipe's ``trl.max_completion_length``).
        threads: CPU threads for torch: a number, "auto" (the cores this process may use, at most
            16) or None (the suite's setting, "auto" for the real base; else 1: the tiny models are
            too small for a second thread to pay). SVDs always run on one thread (``one_thread``).
        trace: Record sparsity along training (bf16 and fp32 views) and the net-drift ratio (keeps
            three fp32 copies of the weights in memory). Turn off for large ``--model`` runs.
        progress: Progress within each training run (``report.progress`` modes): ``auto`` shows the
            trainer's bar on a terminal and a steps/s + ETA line every ~10 s otherwise.
        seeds: Seeds for every recipe, replacing each recipe's own ``seeds`` (None keeps them).
        real_base: A packaged pretrained base (``smollm2-135m``, see ``lab.real``) instead of the tiny one;
            it brings its suite (``recipes/real/suite.json``): chat tasks, test sets, pre-registration.
        style: Prompt style of the tasks: "plain" (tiny base) or "chat" (an instruction-tuned base).
        test_families: Held-out task families measured for every run (default: eval family, the
            recipe's family and "sub").
        preregistration: The thresholds fixed before the run (default: the built-in file; the real
            suite has its own).
        eval_batch: Prompts per greedy-evaluation batch.
        sample_batch: Prompts per policy-sampling batch (RFT and DPO data).
        rank_matrices: Update rank (Table 2) on this many matrices, evenly spaced (None: all).
        grid: Run each recipe's learning-rate x steps ``grid`` (``lab.grid``) instead of its sweep
            and Conjecture 1 ("all" and "real" take the recipes that have a grid).
        grid_learning_rates: With ``grid``, train only these of each grid's learning rates in this
            session (None: all). The others stay planned: the report counts the grid as unfinished and
            a later ``--resume`` trains them. Each must be a learning rate of some named recipe's grid.
        table4_pairs: Table 4's data and algorithm pairs (``Suite.table4_pairs``; the real suite sets
            them), recorded in run.json and measured by ``lab.overlaps`` when the report renders.
        table4_declared: When those pairs were chosen (shown beside them).
        jobs: Worker processes running the cells side by side (``lab.parallel``): a number, "auto"
            (on CPU the cores, at most 4 and at most the runnable tasks; 1 on CUDA) or None (the
            suite's setting, "auto" for the real base; else 1). Each worker gets ``threads // jobs``
            torch threads (at least 1). With ``grid`` the tasks are the grids' learning rates.
    """

    out: Path
    model: str | None = None
    device: str = "cpu"
    dataset: str | None = None
    quick: bool = False
    checkpoint_dtype: str = "bfloat16"
    compute: str = "auto"
    weights: str = "float32"
    base: BaseConfig = field(default_factory=BaseConfig)
    cache_dir: str | None = None
    eval_family: str = "add"
    n_test: int | dict = 1000
    conjecture: bool = True
    report: bool = True
    max_new_tokens: int = 6
    threads: int | str | None = None
    trace: bool = True
    progress: str = "auto"
    seeds: list[int] | None = None
    real_base: str | None = None
    style: str = "plain"
    test_families: list[str] | None = None
    preregistration: Preregistration | None = None
    eval_batch: int = 256
    sample_batch: int = 256
    rank_matrices: int | None = None
    grid: bool = False
    grid_learning_rates: list[float] | None = None
    table4_pairs: list[dict] = field(default_factory=list)
    table4_declared: str = ""
    jobs: int | str | None = None


class _Run:
    """State of one lab run: the base, its tokenizer, test sets and cached policy samples."""

    def __init__(self, opts: LabOptions, log):
        self.opts, self.log = opts, log
        self._samples: dict = {}
        self._base_acc: dict = {}
        self.base_path: Path | None = None
        self._jsonl: list[Problem] | None = load_jsonl(opts.dataset) if opts.dataset else None
        self.n_test = opts.n_test
        self._start_acc: dict = {}
        self.start_hashes: dict = {}
        self._probe_base: dict = {}

    def problems(self, family: str) -> tuple[list[Problem], list[Problem]]:
        if self._jsonl is not None:
            import random

            rows = list(self._jsonl)
            random.Random(self.opts.base.seed).shuffle(rows)
            n_test = min(self.family_n_test("jsonl"), max(1, len(rows) // 10))
            return rows[n_test:], rows[:n_test]
        # The base's own split (its seed): held-out problems were never in its pretraining corpus.
        return split(family, seed=self.opts.base.seed, n_test=self.family_n_test(family),
                     digits=self.opts.base.digits, style=self.opts.style)

    def family_n_test(self, family: str) -> int:
        n = self.n_test
        return int(n.get(family, 200)) if isinstance(n, dict) else int(n)

    def test_sets(self, recipe: Recipe) -> dict[str, list[Problem]]:
        if self._jsonl is not None:
            return {"jsonl": self.problems("jsonl")[1]}
        fams = dict.fromkeys(self.opts.test_families or [self.opts.eval_family, recipe.family, "sub"])
        return {f: self.problems(f)[1] for f in fams}

    def eval_key(self, recipe: Recipe) -> str:
        return "jsonl" if self._jsonl is not None else self.opts.eval_family

    def base_accuracy(self, recipe: Recipe) -> dict[str, float]:
        tests = self.test_sets(recipe)
        # Cached in the run folder: on the real base one evaluation costs minutes, and a resumed run
        # must compare against the same numbers.
        cache = self.opts.out / "base_accuracy.json"
        if not self._base_acc and cache.is_file():
            self._base_acc = json.loads(cache.read_text())
        missing = [f for f in tests if f not in self._base_acc]
        if missing:
            model, tok = load_model(self.base_path, self.opts.device)
            for f in missing:
                begun = time.time()
                self._base_acc[f] = self.accuracy(model, tok, tests[f])
                self.log(f"  base accuracy on {len(tests[f])} held-out {f} problems: {self._base_acc[f]:.1%} "
                         f"({time.time() - begun:.0f}s)")
            _write_json(cache, self._base_acc)
        return {f: self._base_acc[f] for f in tests}

    def accuracy(self, model, tok, problems: list[Problem]) -> float:
        return accuracy(model, tok, problems, batch_size=self.opts.eval_batch, max_new_tokens=self.opts.max_new_tokens)

    def start_accuracy(self, recipe: Recipe, start: Path) -> dict[str, float]:
        """Held-out accuracy of a recipe's own starting model (a pre-SFT model), cached by folder."""
        if start == self.base_path:
            return self.base_accuracy(recipe)
        if start not in self._start_acc:
            model, tok = load_model(start, self.opts.device)
            self._start_acc[start] = {f: self.accuracy(model, tok, probs) for f, probs in self.test_sets(recipe).items()}
        return self._start_acc[start]

    def probe_pairs(self, tokenizer=None) -> list[tuple[str, str]]:
        """The fixed KL probe set: the first 256 held-out problems of the evaluation task with their answers
        (chat problems as the text the model is given, through its chat template)."""
        family = "jsonl" if self._jsonl is not None else self.opts.eval_family
        probs = self.problems(family)[1][:256]
        if tokenizer is not None and any(p.style == "chat" for p in probs):
            return list(zip(prompt_texts(probs, tokenizer), (p.answer for p in probs)))
        return [(p.prompt, p.answer) for p in probs]

    def probe_base(self, start: Path) -> tuple:
        """The start model's tokenizer and its ``measure.probe_logprobs`` on the probe set, computed
        once per process: every cell from the same start shares them (only the last start is kept)."""
        if start not in self._probe_base:
            model, tok = load_model(start, self.opts.device)
            self._probe_base = {start: (tok, measure.probe_logprobs(model, tok, self.probe_pairs(tok)))}
        return self._probe_base[start]

    def samples_file(self, recipe: Recipe, problems: list[Problem]) -> tuple[tuple, Path]:
        """The key and file of the policy samples a recipe (at its seed) trains on."""
        key = (recipe.family, len(problems), recipe.samples_per_prompt, recipe.seed, float(recipe.sample_temperature))
        name = "{}-{}-{}-seed{}".format(*key[:4]) + ("" if key[4] == 1.0 else f"-t{key[4]:g}")
        return key, self.opts.out / "samples" / (name + ".json")

    def policy_samples(self, recipe: Recipe, problems: list[Problem]):
        key, cache = self.samples_file(recipe, problems)
        if key not in self._samples and cache.is_file():
            self._samples[key] = json.loads(cache.read_text())
        if key not in self._samples:
            model, tok = load_model(self.base_path, self.opts.device)
            self.log(f"  sampling {recipe.samples_per_prompt} completions x {len(problems)} prompts from the base "
                     f"at temperature {recipe.sample_temperature:g}")
            self._samples[key] = labdata.sample(model, tok, problems, recipe.samples_per_prompt, seed=recipe.seed,
                                                temperature=float(recipe.sample_temperature),
                                                max_new_tokens=self.opts.max_new_tokens,
                                                batch_size=self.opts.sample_batch)
            _write_json(cache, self._samples[key])
        return self._samples[key]


def _set_seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _quiet() -> None:
    """Silence per-step library chatter; the lab prints its own progress lines."""
    import datasets
    import transformers

    datasets.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# Training data built from the task alone; every other kind is built from the base's own samples.
SAMPLE_FREE_DATA = ("ground_truth", "prompts", "constructed_pairs")


def training_problems(run: _Run, recipe: Recipe) -> list[Problem]:
    """The problems a recipe trains on (its family's training split, the first ``n_train``)."""
    return run.problems(recipe.family)[0][:recipe.n_train]


def build_rows(run: _Run, recipe: Recipe) -> list[dict]:
    train = training_problems(run, recipe)
    if recipe.data == "ground_truth":
        return labdata.sft_rows(train)
    if recipe.data == "prompts":
        return labdata.grpo_rows(train)
    if recipe.data == "constructed_pairs":
        return labdata.constructed_pairs(train, seed=recipe.seed)
    samples = run.policy_samples(recipe, train)
    if recipe.algorithm in ("sft", "rft"):
        rows = labdata.rft_rows(train, samples)
    elif recipe.algorithm == "kto":
        rows = labdata.kto_rows(train, samples)
    elif recipe.data == "random_rejected":
        rows = labdata.random_rejected_pairs(train, samples, seed=recipe.seed)
    elif recipe.data == "format_pairs":
        rows = labdata.format_pairs(train, samples)
    else:
        rows = labdata.policy_pairs(train, samples)
    if not rows:
        raise UsageError(f"recipe {recipe.name}: the base produced no usable samples (no correct/incorrect mix); "
                         "use a base that is right part of the time")
    return rows


def resolve_precision(opts: "LabOptions") -> dict:
    """The precision a run trains with: master weights, compute (autocast) and checkpoint dtypes."""
    compute = opts.compute
    if compute == "auto":
        compute = "bfloat16" if _native_bf16(opts.device) else "float32"
    if opts.weights == "bfloat16":
        compute = "bfloat16"  # pure bf16: the weights are the compute dtype, no autocast
    return {"master_weights": opts.weights, "compute": compute, "checkpoint": opts.checkpoint_dtype}


def _native_bf16(device: str) -> bool:
    import torch

    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


# The lab's trainer name for each recipe algorithm: RFT is SFT on the policy's own correct samples.
_TRAINER = {"rft": "sft"}
# Lab-wide defaults per trainer (answers are a few tokens); a recipe's "trl" block overrides them.
_GENERATION = dict(max_completion_length=6, temperature=1.0)
_LAB_DEFAULTS = {
    "sft": dict(max_length=32, packing=False, completion_only_loss=True),
    "dpo": dict(max_length=32, beta=0.1),
    "kto": dict(max_length=32, beta=0.1),
    "orpo": dict(max_length=32, beta=0.1),
    "simpo": dict(max_length=32),
    "grpo": dict(num_generations=8, loss_type="grpo", beta=0.0, log_completions=False, **_GENERATION),
    "rloo": dict(num_generations=8, beta=0.0, log_completions=False, **_GENERATION),
    "ppo": dict(**_GENERATION),
    "prime": dict(num_generations=4, **_GENERATION),
}


def _trl_config(recipe: Recipe, lr: float, workdir: str, device: str, autocast_bf16: bool = False):
    from rlsparse.train.trainers import algorithm

    name = _TRAINER.get(recipe.algorithm, recipe.algorithm)
    algo = algorithm(name)
    _, cls = algo.classes()
    common = dict(output_dir=workdir, learning_rate=lr, max_steps=recipe.steps,
                  per_device_train_batch_size=recipe.batch_size, gradient_accumulation_steps=1, logging_steps=1,
                  save_strategy="no", report_to="none", seed=recipe.seed, data_seed=recipe.seed,
                  use_cpu=(device == "cpu"), bf16=autocast_bf16, fp16=False, disable_tqdm=True, weight_decay=0.0,
                  dataloader_num_workers=0,
                  # TRL turns activation (gradient) checkpointing on by default: for the lab's small models it
                  # only buys memory they do not need, at the price of a second forward per step.
                  activation_checkpointing=False)
    extra = dict(recipe.trl)
    unknown = sorted(set(extra) - set(cls.__dataclass_fields__))
    if unknown:
        raise UsageError(f"recipe {recipe.name}: trl fields {unknown} are not {cls.__name__} fields; "
                         "fix the recipe's 'trl' block (see the TRL docs for the config)")
    try:
        return cls(**{**common, **algo.defaults, **_LAB_DEFAULTS.get(name, {}), **extra})
    except ValueError as exc:
        raise UsageError(f"recipe {recipe.name}: TRL rejected the config ({exc}); fix the recipe") from None


def train_one(run: _Run, recipe: Recipe, lr: float, rows: list[dict], out: Path, mask=None,
              start: Path | None = None) -> dict:
    """Train one recipe at one learning rate from the base; save the checkpoint; return its log.

    Training goes through ``rlsparse.train.trainers.build_trainer``, the path ``rlsparse train``
    takes: a masked rerun is the same trainer with ``MaskCallback`` (verified at the end). The
    checkpoint is followed by ``trained.json`` (``lab.trained``); when ``out`` already holds a
    complete checkpoint whose record names this very cell, it is evaluated without training again.
    """
    begun = time.time()
    cell = train_cell(run, recipe, lr, rows, start=start, mask=mask)
    trained = trained_record.load(out, cell)
    evaluated = None
    if trained is None:
        trained = train_checkpoints(run, recipe, lr, rows, {recipe.steps: out}, cell, mask=mask, start=start)[recipe.steps]
    else:
        evaluated = trained_record.load(out, cell, trained_record.EVALUATED)
        run.log(f"    {out}: its checkpoint and trained.json match this cell; "
                + ("reading its evaluation back" if evaluated else "evaluating it") + ", not training it again")
    # training = the trainer's steps; training_setup = loading, building the trainer, saving, hashing
    setup = round(time.time() - begun - (trained.get("seconds") or 0.0), 2)
    if evaluated is None:
        evaluated = evaluate_checkpoint(run, recipe, out)
        trained_record.save(out, cell, evaluated, trained_record.EVALUATED)
    evaluated = dict(evaluated)
    phases = {"training": trained.get("seconds"), "training_setup": setup, "evaluation": evaluated["eval_seconds"],
              "evaluation_load": evaluated.pop("eval_load_seconds")}
    return {**trained, **evaluated, "phase_seconds": phases}


def evaluate_checkpoint(run: _Run, recipe: Recipe, folder: Path) -> dict:
    """Held-out accuracy of a checkpoint as saved: the same view the sparsity numbers use."""
    loading = time.time()
    saved, tok = load_model(folder, run.opts.device)
    begun = time.time()
    acc = {f: run.accuracy(saved, tok, probs) for f, probs in run.test_sets(recipe).items()}
    return {"accuracy": acc, "eval_seconds": round(time.time() - begun, 2),
            "eval_load_seconds": round(begun - loading, 2)}


def train_cell(run: _Run, recipe: Recipe, lr: float, rows: list[dict], start: Path | None = None, mask=None,
               step: int | None = None) -> dict:
    """What makes a trained checkpoint this cell's: recipe (with its seed), learning rate, the start
    checkpoint's and the data's hashes, the mask's, and the step it was saved at."""
    start = Path(start or run.base_path)
    if start not in run.start_hashes:
        run.start_hashes[start] = trained_record.checkpoint_sha256(start)
    return {"recipe": recipe.cell_dict(), "learning_rate": lr, "start": _relative(run, start),
            "start_sha256": run.start_hashes[start], "rows_sha256": trained_record.rows_sha256(rows),
            "mask_sha256": trained_record.mask_sha256(mask), "step": recipe.steps if step is None else step,
            "checkpoint_dtype": run.opts.checkpoint_dtype, "precision": resolve_precision(run.opts)}


def train_checkpoints(run: _Run, recipe: Recipe, lr: float, rows: list[dict], saves: dict[int, Path], cell: dict,
                      mask=None, start: Path | None = None) -> dict[int, dict]:
    """Train ``recipe.steps`` steps (the schedule's length), saving a checkpoint at each step of ``saves``.

    Training stops after the largest step of ``saves``; every checkpoint is followed by its
    ``trained.json`` (``cell`` with that step). Returns each step's training log (losses, step
    costs, clip share, trace up to that step; the net-drift ratio and the checkpoint-series counts
    of ``trace.sparsity_trace`` at the last step only).
    """
    import warnings

    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from rlsparse.lab.cost import StepCost
    from rlsparse.train.trainers import algorithm, build_trainer

    # TRL 1.16 sets transformers options that transformers 5.24 renamed: a FutureWarning per run
    # that tells a lab user nothing.
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6.*", category=FutureWarning)
    bad = sorted(s for s in saves if not 1 <= s <= recipe.steps)
    if bad:
        raise UsageError(f"recipe {recipe.name}: checkpoint steps {bad} are outside 1..{recipe.steps}; fix its grid")
    last = max(saves)
    recipe, class_weights = kto_class_weights.resolve(recipe, rows)  # KTO's "balanced": from these rows' counts
    _set_seed(recipe.seed)
    precision = resolve_precision(run.opts)
    model, tok = load_model(start or run.base_path, run.opts.device, weights=precision["master_weights"])
    name = _TRAINER.get(recipe.algorithm, recipe.algorithm)
    tracer = sparsity_trace(model, recipe.steps, also=saves) if run.opts.trace else None
    cost = StepCost()
    meta = {"recipe": recipe.name, "learning_rate": lr, "subnetwork_only": mask is not None, "precision": precision}
    logs: dict[int, dict] = {}

    def record(step: int, history: list[dict], drift, series=None) -> dict:
        kept = [h for h in _losses(history) if h.get("step", 0) <= step]
        return {"seconds": round(time.time() - begun, 2), "rows": len(rows), "log_history": kept,
                "trainer": trainer_name, "trl_config": effective,
                "step_cost": cost.summary(upto=step), "signal": signal_steps(kept),
                "trace": [t for t in tracer.trace if t["step"] <= step] if tracer is not None else None,
                "net_drift": drift, "series": series,
                "clip_active_share": _clip_share(kept, effective.get("max_grad_norm")),
                **({"class_weights": class_weights} if class_weights else {})}

    class _Checkpoints(TrainerCallback):
        """Saves the checkpoints before the last; each one's record once its step's log is written."""

        def __init__(self):
            self.pending: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step in saves and step != last:
                save_model(model, tok, saves[step], dtype=run.opts.checkpoint_dtype, meta={**meta, "step": step})
                self.pending.append(step)
            if step >= last:
                control.should_training_stop = True

        def on_step_begin(self, args, state, control, **kwargs):
            # The previous step's log entry exists now (logging follows on_step_end).
            for step in self.pending:
                logs[step] = record(step, state.log_history, None)
                trained_record.save(saves[step], {**cell, "step": step}, logs[step])
            self.pending = []

    saver = _Checkpoints()
    with tempfile.TemporaryDirectory(prefix="rlsparse-lab-") as workdir:
        autocast = precision["compute"] == "bfloat16" and precision["master_weights"] == "float32"
        args = _trl_config(recipe, lr, workdir, run.opts.device, autocast_bf16=autocast)
        shown = training_progress(run.opts.progress, f"{recipe.name} lr={lr:g}",
                                  write=lambda line: run.log(f"    {line}"))
        effective = {k: _plain(getattr(args, k)) for k in _RECORDED if hasattr(args, k)}
        trainer = build_trainer(name, model, args, Dataset.from_list(rows), tok, mask=mask, verify=mask is not None,
                                reward_funcs=[reward] if algorithm(name).uses_rewards else None,
                                # The cost callback first: its step ends before the trace's measurement.
                                callbacks=[cost] + [c for c in (tracer, shown) if c is not None] + [saver])
        trainer.remove_callback(PrinterCallback)
        cost.attach(trainer)
        trainer_name = type(trainer).__name__
        begun = time.time()
        trainer.train()
        saver.on_step_begin(None, trainer.state, None)  # records of checkpoints saved at the last steps
        final = trainer.model
        history = list(trainer.state.log_history)
        logs[last] = record(last, history, *((tracer.drift, tracer.series) if tracer is not None else (None, None)))
    save_model(final, tok, saves[last], dtype=run.opts.checkpoint_dtype,
               meta={**meta, "step": last} if len(saves) > 1 else meta)
    trained_record.save(saves[last], {**cell, "step": last}, logs[last])
    del trainer, final, model
    return logs


def _clip_share(history: list[dict], max_norm) -> float | None:
    """Share of logged steps whose pre-clipping gradient norm exceeded ``max_grad_norm`` (clipping acted)."""
    norms = [h["grad_norm"] for h in history if isinstance(h.get("grad_norm"), (int, float))]
    if not max_norm or not norms:
        return None
    return sum(n > float(max_norm) for n in norms) / len(norms)


_RECORDED = ("learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
             "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim", "seed", "beta",
             "loss_type", "num_generations", "max_completion_length", "temperature", "epsilon", "scale_rewards",
             "max_length", "completion_only_loss", "bf16", "desirable_weight", "undesirable_weight")


def _plain(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _losses(log_history: list[dict]) -> list[dict]:
    keep = ("step", "loss", "reward", "rewards/reward/mean", "kl", "grad_norm", "learning_rate", "reward_std",
            "frac_reward_zero_std")
    return [{k: e[k] for k in keep if k in e} for e in log_history if "loss" in e]


def _lr_label(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


class Progress:
    """Cells done out of planned, with elapsed time and an ETA from the cells run in this session.

    ``assembling``: the cells were trained by worker processes (or an earlier session) and are only
    read back, so a finished cell is not said to come from an earlier session."""

    def __init__(self, total: int, log, assembling: bool = False):
        self.total, self.log, self.done, self.ran = total, log, 0, []
        self.started = time.time()
        self.kept = "on disk, read back" if assembling else "finished earlier, kept (resume)"

    def skip(self, label: str) -> None:
        self.done += 1
        self.log(f"[{self.done}/{self.total}] {label}: {self.kept}")

    def finish(self, label: str, seconds: float) -> None:
        self.done += 1
        self.ran.append(seconds)
        left = self.total - self.done
        eta = left * sum(self.ran) / len(self.ran)
        self.log(f"[{self.done}/{self.total}] {label}: {_clock(seconds)}; elapsed {_clock(time.time() - self.started)}, "
                 f"ETA {_clock(eta)} for {left} more cell{'s' if left != 1 else ''}")


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _finished(folder: Path) -> dict | None:
    """The measurements of a finished cell, or None. metrics.json is written last, atomically."""
    metrics = folder / "metrics.json"
    if metrics.is_file() and (folder / "config.json").is_file():
        return json.loads(metrics.read_text())
    return None


def run_recipe(run: _Run, recipe: Recipe, progress: Progress | None = None) -> dict:
    """Run one recipe over its learning-rate sweep, once per seed; returns its results entry.

    Every point records, besides sparsity and accuracy, the measurements the verdicts match on:
    KL(start || finetuned) on the fixed probe set, ||Δθ|| in fp32, the rank of the update next to
    the rank of the same entries at random positions, the share of steps where clipping acted and
    the net-drift ratio of the fp32 master weights, and the cost of a step by phase.

    A cell (learning rate x seed) whose ``metrics.json`` exists is finished: it is read back, never
    rerun (measurements a newer rlsparse adds are filled in from its checkpoint).
    """
    points, entry = [], _cached_entry(run, recipe)
    for seed in recipe.seeds:
        state: dict = {}
        for lr in recipe.learning_rates:
            point, entry = run_cell(run, recipe, seed, lr, entry, state, progress)
            points.append(point)
    if not entry:
        first = replace(recipe, seed=recipe.seeds[0])
        rows = build_rows(run, first)
        start = _pre_sft(run, first, rows) if recipe.pre_sft else run.base_path
        entry = _entry(run, recipe, rows, start, run.start_accuracy(first, start))
    return {**entry, "points": points, "seed_overlap": _seed_overlaps(run, recipe, points)}


def run_cell(run: _Run, recipe: Recipe, seed: int, lr: float, entry: dict | None = None, state: dict | None = None,
             progress: Progress | None = None, with_entry: bool = True) -> tuple[dict, dict]:
    """Run (or read back) one cell of a recipe: one learning rate at one seed; returns (point, entry).

    ``entry`` is the recipe's data summary ({} until a cell computes it; a cell computes it only
    when none is cached and ``with_entry``). ``state`` carries the seed's rows and start between
    the cells of one seed.
    """
    entry = _cached_entry(run, recipe) if entry is None else entry
    state = {} if state is None else state
    seeded = replace(recipe, seed=seed)
    folder = cell_folder(run, recipe, lr, seed)
    label = f"{recipe.name} lr={lr:g} seed {seed}"
    done = _finished(folder)
    if done is not None:
        if not _MEASURED.issubset(done):
            begin = run.opts.out / done["start"] if done.get("start", "base") != "base" else run.base_path
            done = _measure_point(run, begin, folder, done, run.start_accuracy(seeded, begin))
            done.update(learning_rate=lr, seed=seed, start=_relative(run, begin))
            _write_json(folder / "metrics.json", done)
        if progress:
            progress.skip(label)
        return done, entry
    if "rows" not in state:
        state["rows"] = rows = build_rows(run, seeded)
        state["start"] = start = _pre_sft(run, seeded, rows) if recipe.pre_sft else run.base_path
        state["start_acc"] = run.start_accuracy(seeded, start)
    rows, start, start_acc = state["rows"], state["start"], state["start_acc"]
    if not entry and with_entry:
        entry = _entry(run, recipe, rows, start, start_acc)
    begun = time.time()
    run.log(f"  {recipe.name}: lr={lr:g}, seed {seed}, {recipe.steps} steps on {len(rows)} rows")
    trained = train_one(run, seeded, lr, rows, folder, start=start)
    point = _measure_point(run, start, folder, trained, start_acc)
    point.update(learning_rate=lr, seed=seed, start=_relative(run, start), cell_seconds=round(time.time() - begun, 1))
    _write_json(folder / "metrics.json", point)
    cost = (trained.get("step_cost") or {}).get("per_step_seconds", {})
    run.log(f"    sparsity@1e-5 {point['sparsity']['1e-05']:.1%}, KL {point['probe_kl']:.2e}, accuracy "
            + ", ".join(f"{f} {a:.1%}" for f, a in trained["accuracy"].items())
            + (f"; {cost['total']:.1f}s/step" if cost else "")
            + (f"; steps with signal {trained['signal']['with_signal']}/{trained['signal']['steps']}"
               if trained.get("signal") else ""))
    if progress:
        progress.finish(label, point["cell_seconds"])
    return point, entry


# Measurements every point has; a cell finished by an older rlsparse without them gets them from its checkpoint.
_MEASURED = frozenset({"probe_kl", "delta_norm", "update_rank_random_control", "sparsity", "accuracy"})


def _entry(run: _Run, recipe: Recipe, rows: list[dict], start: Path, start_acc: dict) -> dict:
    entry = {"recipe": recipe.to_dict(), "rows": len(rows), "base_accuracy": start_acc,
             "data_nll": _data_nll(run, start, rows)}
    _write_json(run.opts.out / "runs" / recipe.name / "entry.json", entry)
    return entry


def _cached_entry(run: _Run, recipe: Recipe) -> dict:
    """A recipe's data summary from an earlier session of the run (same recipe), or {}."""
    path = run.opts.out / "runs" / recipe.name / "entry.json"
    if not path.is_file():
        return {}
    entry = json.loads(path.read_text())
    # The data summary belongs to the recipe's first seed: more seeds added later do not change it.
    return entry if cell_fields(entry.get("recipe") or {}) == json.loads(json.dumps(recipe.cell_dict())) else {}


def _seed_overlaps(run: _Run, recipe: Recipe, points: list[dict]) -> list[dict]:
    """Table 4: subnetwork overlap of the first two seeds at every learning rate (same start, same data recipe)."""
    if len(recipe.seeds) < 2:
        return []
    out = []
    for lr in recipe.learning_rates:
        a, b = (next((p for p in points if p["seed"] == s and p["learning_rate"] == lr), None) for s in recipe.seeds[:2])
        if a is None or b is None or a["start"] != "base":
            continue  # different starts (pre-SFT per seed): not the same base to overlap against
        # One pair per overlap call, as these rows always were: the stratified null's sums keep their order.
        ov = subnetwork_overlaps(run.base_path, [run.opts.out / a["checkpoint"], run.opts.out / b["checkpoint"]],
                                 [(0, 1)])[0]
        out.append({"learning_rate": lr, "seeds": recipe.seeds[:2], **{k: ov[k] for k in _SEED_OVERLAP}})
    return out


# What a recipe's ``seed_overlap`` rows hold (results.json): the overlaps and both random nulls.
_SEED_OVERLAP = ("o1", "o2", "jaccard", "o1_random", "o2_random", "o1_stratified", "o2_stratified")


def cell_folder(run: _Run, recipe: Recipe, lr: float, seed: int) -> Path:
    """Where one cell (recipe x learning rate x seed) of a run lands."""
    return run.opts.out / "runs" / recipe.name / _point_label(lr, seed, recipe.seeds[0])


def _point_label(lr: float, seed: int, first_seed: int) -> str:
    return f"lr-{_lr_label(lr)}" + ("" if seed == first_seed else f"-seed{seed}")


def _relative(run: _Run, path: Path) -> str:
    try:
        return str(Path(path).relative_to(run.opts.out))
    except ValueError:
        return "base"


def _measure_point(run: _Run, start: Path, folder: Path, trained: dict, start_acc: dict) -> dict:
    phases: dict[str, float] = {}

    def timed(name: str, fn):
        begun = time.time()
        value = fn()
        phases[name] = round(time.time() - begun, 2)
        return value

    sp = timed("sparsity", lambda: measure.sparsity(start, folder))
    rank = timed("update_rank", lambda: measure.update_rank(start, folder, max_matrices=run.opts.rank_matrices))
    control = timed("rank_control",
                    lambda: measure.random_rank_control(start, folder, max_matrices=run.opts.rank_matrices))
    after, _ = timed("load_models", lambda: load_model(folder, run.opts.device))
    # The start model's side of the KL is the same for every cell from that start: computed once.
    tok, base_logprobs = timed("probe_base", lambda: run.probe_base(Path(start)))
    kl = timed("probe_kl", lambda: measure.probe_kl(None, after, tok, run.probe_pairs(tok), base_logprobs=base_logprobs))
    del after
    norm = timed("delta_norm", lambda: measure.delta_norm(start, folder))
    return {"checkpoint": str(folder.relative_to(run.opts.out)), **trained,
            "sparsity": sp["sparsity"], "changed": sp["changed"], "numel": sp["numel"],
            "by_layer": sp["by_layer"], "by_type": sp["by_type"], "grid": sp["grid"],
            "update_rank": rank["mean_rank_fraction"], "update_rank_random_control": control["mean_rank_fraction"],
            "probe_kl": kl, "delta_norm": norm,
            "phase_seconds": {**trained.get("phase_seconds", {}), **phases},
            "accuracy_gain": {f: trained["accuracy"][f] - start_acc.get(f, float("nan"))
                              for f in trained["accuracy"]}}


def _data_nll(run: _Run, start: Path, rows: list[dict], limit: int = 512) -> dict:
    """Per-token NLL of each target column of the training data under the recipe's starting policy."""
    model, tok = load_model(start, run.opts.device)
    out = {}
    for column in ("completion", "chosen", "rejected", "answer"):
        pairs = [_text_pair(tok, r["prompt"], r[column]) for r in rows[:limit] if r.get(column) is not None]
        if pairs:
            out[column] = measure.dataset_nll(model, tok, pairs)
    return out


def _text_pair(tokenizer, prompt, target) -> tuple[str, str]:
    """A row's prompt and target as the text the model sees (conversational rows through the chat template)."""
    if isinstance(prompt, list):
        prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if isinstance(target, list):
        target = target[-1]["content"]
    return prompt, str(target)


def pre_sft_recipe(recipe: Recipe) -> Recipe:
    """The SFT a recipe with ``pre_sft`` runs first: its learning rate and steps, the recipe's
    ``max_length`` (a chat reply with its template is longer than the lab's default)."""
    keep = {k: v for k, v in recipe.trl.items() if k == "max_length"}
    return replace(recipe, name=f"{recipe.name}-pre-sft", algorithm="sft", data="ground_truth", trl=keep,
                   steps=int(recipe.pre_sft["steps"]), learning_rates=[float(recipe.pre_sft["learning_rate"])],
                   pre_sft=None, conjecture=False)


def _pre_sft(run: _Run, recipe: Recipe, rows: list[dict]) -> Path:
    """SFT the base on the chosen answers of a recipe's pairs (Table 5's manipulation); the recipe's start."""
    folder = run.opts.out / "runs" / recipe.name / f"pre-sft-seed{recipe.seed}"
    sft = pre_sft_recipe(recipe)
    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    run.log(f"  {recipe.name}: SFT first on {len(sft_rows)} chosen answers, lr {sft.learning_rates[0]:g}, "
            f"{sft.steps} steps")
    trained = train_one(run, sft, sft.learning_rates[0], sft_rows, folder)
    _write_json(folder / "metrics.json", {k: v for k, v in trained.items() if k != "trace"})
    return folder


def run_conjecture(run: _Run, recipe: Recipe, entry: dict, tolerance: str = measure.PAPER_TOLERANCE) -> dict:
    """Conjecture 1 with its controls: retrain from the same start, same data/seed/steps, updating only
    the full run's subnetwork; then a random mask of the same per-tensor density, and a reseeded full run.

    The full run is the recipe's pre-registered ``conjecture_lr`` at its first seed. Without one, the
    sparsest point that learned (a best-case selection, labelled so in the result and the report).
    The result lands in ``conjecture/<recipe>/result.json``; a finished one is read back, never rerun.
    """
    done = run.opts.out / "conjecture" / recipe.name / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    result = _conjecture(run, recipe, entry, tolerance)
    _write_json(done, result)
    return result


def same_lr(a: float | None, b: float | None) -> bool:
    """The lab's learning-rate match (``math.isclose``, rel_tol 1e-9: a learning rate read back from
    JSON or a command line is the recipe's); None matches nothing."""
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)


def conjecture_choice(run: _Run, recipe: Recipe, points: list[dict]) -> tuple[dict, str]:
    """The full run Conjecture 1 reruns (a point of the recipe's first seed) and how it was selected."""
    firsts = [p for p in points if p.get("seed", recipe.seeds[0]) == recipe.seeds[0]]
    if recipe.conjecture_lr is not None:
        chosen = [p for p in firsts if same_lr(p["learning_rate"], recipe.conjecture_lr)]
        if not chosen:
            raise UsageError(f"recipe {recipe.name}: conjecture_lr {recipe.conjecture_lr:g} is not one of its "
                             f"learning_rates {recipe.learning_rates}; add it to the sweep")
        return chosen[0], "pre-registered (conjecture_lr in the recipe)"
    best = choose_subnetwork_run(firsts, run.eval_key(recipe), run.preregistration["learned_gain"])
    return best, "best case (chosen after the sweep: the sparsest point that learned)"


def _conjecture_start(run: _Run, best: dict) -> Path:
    return run.opts.out / best["start"] if best.get("start", "base") != "base" else run.base_path


def _reseeded_point(recipe: Recipe, points: list[dict], lr: float, seed: int) -> dict | None:
    """A finished full run at ``lr`` with another seed (the reseeded control, when the sweep has one)."""
    return next((p for p in points if p.get("seed") not in (None, seed)
                 and same_lr(p["learning_rate"], lr)), None)


def conjecture_part(run: _Run, recipe: Recipe, points: list[dict], part: str,
                    tolerance: str = measure.PAPER_TOLERANCE) -> None:
    """Train one of Conjecture 1's three models ("sub", "random" or "reseeded") into its folder, as
    ``run_conjecture`` would: a worker process runs each as its own task, and ``run_conjecture``
    then reads the three back (``train_one`` finds them trained and evaluated)."""
    best, _ = conjecture_choice(run, recipe, points)
    lr, seed = best["learning_rate"], recipe.seeds[0]
    seeded = replace(recipe, seed=seed)
    start = _conjecture_start(run, best)
    root = run.opts.out / "conjecture" / recipe.name
    if part == "reseeded":
        if _reseeded_point(recipe, points, lr, seed) is None:
            again = replace(recipe, seed=seed + 1)
            train_one(run, again, lr, build_rows(run, again), root / "reseeded", start=start)
        return
    with tempfile.TemporaryDirectory(prefix="rlsparse-lab-") as tmp:
        # The mask file itself is written by run_conjecture; here it only has to be the same mask
        # (read from its file while training: the file stays until the training ends).
        mask = measure.subnetwork_mask(start, run.opts.out / best["checkpoint"], Path(tmp) / "mask.safetensors",
                                       tolerance)
        if mask.density == 0:
            return
        rows = build_rows(run, seeded)
        if part == "sub":
            train_one(run, seeded, lr, rows, root / "sub", mask=mask, start=start)
        else:
            train_one(run, seeded, lr, rows, root / "random", mask=random_mask_like(mask, seed=seed), start=start)


def _conjecture(run: _Run, recipe: Recipe, entry: dict, tolerance: str) -> dict:
    best, selection = conjecture_choice(run, recipe, entry["points"])
    lr, seed = best["learning_rate"], recipe.seeds[0]
    seeded = replace(recipe, seed=seed)
    start = _conjecture_start(run, best)
    full = run.opts.out / best["checkpoint"]
    root = run.opts.out / "conjecture" / recipe.name
    mask_path = root / "subnetwork.mask.safetensors"
    mask = measure.subnetwork_mask(start, full, mask_path, tolerance)
    density = mask.density
    common = {"recipe": recipe.name, "learning_rate": lr, "seed": seed, "steps": recipe.steps, "selection": selection,
              "mask_tolerance": tolerance, "mask_density": density, "full_checkpoint": best["checkpoint"]}
    run.log(f"  conjecture 1 on {recipe.name}: lr={lr:g}, subnetwork density {density:.1%} (tol {tolerance}), {selection}")
    if density == 0:
        # Nothing to retrain: the full run moved no weight beyond the tolerance.
        return {**common, "skipped": "the full run changed no parameter beyond the tolerance, so there is no subnetwork"}
    rows = build_rows(run, seeded)
    sub = root / "sub"
    trained = train_one(run, seeded, lr, rows, sub, mask=mask, start=start)
    same = measure.sparsity(full, sub, tolerances=("0", "1e-05", "1e-04"))
    outside = measure.changed_outside(start, sub, mask)
    # Control 1: the same number of trainable elements per tensor, at random positions.
    rmask = random_mask_like(mask, seed=seed)
    rmask.save(root / "random.mask.safetensors")
    rand_dir = root / "random"
    run.log(f"  conjecture 1 control on {recipe.name}: a random mask of the same per-tensor density")
    rand = train_one(run, seeded, lr, rows, rand_dir, mask=rmask, start=start)
    # Control 2: the full run again with another seed: how identical two full runs are by themselves.
    other = _reseeded_point(recipe, entry["points"], lr, seed)
    if other is not None:
        reseeded_dir, reseeded_acc = run.opts.out / other["checkpoint"], other["accuracy"]
    else:
        reseeded_dir = root / "reseeded"
        run.log(f"  conjecture 1 control on {recipe.name}: the full run reseeded (seed {seed + 1})")
        again = replace(recipe, seed=seed + 1)
        reseeded_acc = train_one(run, again, lr, build_rows(run, again), reseeded_dir, start=start)["accuracy"]
    reseeded_same = measure.sparsity(full, reseeded_dir, tolerances=("0", "1e-05", "1e-04"))
    return {**common, "mask": str(mask_path.relative_to(run.opts.out)), "sub_checkpoint": str(sub.relative_to(run.opts.out)),
            "accuracy": {"full": best["accuracy"], "sub": trained["accuracy"], "random_mask": rand["accuracy"],
                         "reseeded_full": reseeded_acc},
            "identical_share": same["sparsity"],
            "identical_share_random_mask": measure.sparsity(full, rand_dir, tolerances=("0", "1e-05", "1e-04"))["sparsity"],
            "identical_share_reseeded_full": reseeded_same["sparsity"],
            "reseeded_checkpoint": _relative(run, reseeded_dir),
            "loss": {"full": best["log_history"], "sub": trained["log_history"], "random_mask": rand["log_history"]},
            "changed_outside_mask": outside,
            "changed_outside_random_mask": measure.changed_outside(start, rand_dir, rmask),
            "phase_seconds": {"sub": trained.get("phase_seconds"), "random_mask": rand.get("phase_seconds")}}


def random_mask_like(mask, seed: int = 0):
    """A mask with exactly as many elements per tensor as ``mask``, placed uniformly at random."""
    import torch

    from rlsparse.masks import Mask

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in mask.names:
        shape = tuple(mask.shape(name))
        n = math.prod(shape)
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=gen)[:mask.count(name)]] = True
        tensors[name] = flat.reshape(shape)
    return Mask.from_tensors(tensors, tolerance=mask.meta.tolerance)


def choose_subnetwork_run(points: list[dict], family: str, learned_gain: float | None = None) -> dict:
    """The sparsest point whose accuracy gain is at least the pre-registered "learned" gain, else the largest-gain point."""
    from rlsparse.lab.stats import at_least

    threshold = load_preregistration()["learned_gain"] if learned_gain is None else learned_gain
    learned = [p for p in points if at_least(p["accuracy_gain"].get(family, float("-inf")), threshold)]
    if learned:
        return max(learned, key=lambda p: p["sparsity"][measure.PAPER_TOLERANCE])
    return max(points, key=lambda p: p["accuracy_gain"].get(family, float("-inf")))


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN stands for "not measured" (e.g. a gain without a base accuracy); numpy scalars become floats.
    write_json(path, obj, indent=1, sort_keys=True, allow_nan=True, default=float)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("rlsparse", "torch", "transformers", "trl", "tokenizers", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def run_lab(names: list[str] | str, opts: LabOptions, log=print, resume: bool = False) -> Path:
    """Run recipes (by name, path, "all", or the "real" suite) into one run folder and render the report.

    Every cell (recipe x learning rate x seed, and each Conjecture 1 rerun) lands on disk atomically
    as it finishes; ``resume=True`` continues a run folder, reading finished cells back instead of
    rerunning them (recipes may be added on resume, not changed).

    Args:
        names: Recipe names or JSON paths, "all" for every built-in tiny-base recipe, or "real" for
            the pre-registered real-base suite (which sets the base, tasks and thresholds).
        opts: Shared options (output folder, base/model, device, quick, precision).
        log: Progress printer.
        resume: Continue the run in ``opts.out`` (it must hold one); without it, a folder holding a
            run is refused.

    Returns:
        The run folder.

    Example:
        >>> run_lab(["grpo", "sft_ood"], LabOptions(out=Path("runs/x"), quick=True))
    """
    import torch

    _require_lab_extras()  # before the run folder exists: a missing extra leaves nothing behind
    if opts.device not in ("cpu", "cuda"):
        raise UsageError(f"--device {opts.device!r} is not supported; use 'cpu' or 'cuda'")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if opts.checkpoint_dtype not in ("bfloat16", "float32"):
        raise UsageError(f"checkpoint dtype {opts.checkpoint_dtype!r} is not supported; use bfloat16 or float32")
    if opts.compute not in ("auto", "bfloat16", "float32") or opts.weights not in ("bfloat16", "float32"):
        raise UsageError(f"compute {opts.compute!r} / weights {opts.weights!r}: expected compute auto, bfloat16 "
                         "or float32 and weights float32 or bfloat16")
    suite = None
    everything = names in ("real", ["real"], "all", ["all"])
    if names in ("real", ["real"]) or opts.real_base:
        # The real base comes with its suite: chat tasks, test sets and pre-registered thresholds.
        suite = "real"
        suite_names = apply_suite(opts, load_suite(suite))
        names = suite_names if names in ("real", ["real"], "all", ["all"]) else names
    elif names == "all" or names == ["all"]:
        names = recipe_names()
    recipes = [load_recipe(n, suite=suite) for n in ([names] if isinstance(names, str) else names)]
    if opts.quick:
        recipes = [r.quickened() for r in recipes]
    if opts.seeds:
        recipes = [replace(r, seeds=list(opts.seeds), seed=opts.seeds[0]) for r in recipes]
    if opts.grid:
        recipes = _grid_recipes(recipes, everything, opts.grid_learning_rates)
    out = Path(opts.out)
    held = (out / "run.json").is_file()
    if held and not resume:
        raise OutputError(f"{out} already holds a lab run; resume it (--resume) or choose a new --out")
    if resume and not held:
        raise OutputError(f"{out} holds no lab run (no run.json) to resume; start one without --resume")
    if out.exists() and any(out.iterdir()) and not held:
        raise OutputError(f"{out} exists and is not an rlsparse lab run folder; pass an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    opts.out = out
    _quiet()
    opts.threads = resolve_threads(opts.threads)
    if opts.device == "cpu":
        torch.set_num_threads(opts.threads)
    run = _Run(opts, log)
    run.preregistration = opts.preregistration or load_preregistration()
    started = time.time()
    if opts.real_base:
        from rlsparse.lab.real import ensure_real_base, real_metadata

        log(f"base: converting or reusing the real base {opts.real_base} ...")
        run.base_path = ensure_real_base(opts.real_base, opts.cache_dir)
        meta = real_metadata(run.base_path) or {}
        log(f"base: {run.base_path} ({meta.get('num_parameters')} parameters, source sha256 "
            f"{str(meta.get('source_sha256'))[:12]}, folder sha256 {str(meta.get('folder_sha256'))[:12]})")
    elif opts.model:
        run.base_path = Path(opts.model)
        log(f"model: {run.base_path}")
    else:
        log("base: building or reusing the cached tiny base ...")
        run.base_path = ensure_base(opts.base, opts.cache_dir, device=opts.device,
                                    progress=lambda s, n, l: log(f"  pretraining step {s}/{n}, loss {l:.3f}")
                                    if s % 40 == 0 else None)
        meta = base_metadata(run.base_path) or {}
        acc = ", ".join(f"{k} {v:.1%}" for k, v in (meta.get("test_accuracy") or {}).items())
        log(f"base: {run.base_path} ({meta.get('num_parameters')} parameters, {meta.get('steps_trained')} steps, "
            f"held-out accuracy {acc})")
        # Held-out problems must come from the base's own held-out split, never its pretraining corpus.
        own = int((meta.get("config") or {}).get("n_test", opts.n_test))
        if isinstance(opts.n_test, int) and own < opts.n_test:
            log(f"  held-out sets: {own} problems per family (the base's own held-out split), not {opts.n_test}")
            run.n_test = own
    previous = json.loads((out / "run.json").read_text()) if held else None
    _link_base(out, run.base_path)
    conj = [r for r in recipes if r.conjecture] if opts.conjecture and not opts.grid else []
    tasks = []
    if opts.jobs not in (None, 1):
        from rlsparse.lab import parallel

        tasks = parallel.plan(run, recipes, conj, grid=opts.grid)
    jobs = _resolve_jobs(opts.jobs, opts.device, len(tasks), run, log)
    worker_threads = max(1, opts.threads // jobs)
    run_meta = {"schema_version": RUN_SCHEMA_VERSION, "kind": "rlsparse-lab-run",
                "created": previous["created"] if previous else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "base": str(run.base_path), "real_base": opts.real_base,
                "base_metadata": base_metadata(run.base_path), "device": opts.device, "quick": opts.quick,
                "threads": opts.threads if opts.device == "cpu" else None,
                "jobs": jobs, "worker_threads": worker_threads if opts.device == "cpu" and jobs > 1 else None,
                "dataset": opts.dataset, "eval_family": opts.eval_family, "n_test": run.n_test,
                "style": opts.style, "test_families": opts.test_families, "max_new_tokens": opts.max_new_tokens,
                "rank_matrices": opts.rank_matrices, "grid": opts.grid,
                "table4_pairs": opts.table4_pairs, "table4_declared": opts.table4_declared,
                "preregistration": run.preregistration.to_json(),
                "precision": {**resolve_precision(opts),
                              "base_checkpoint": _stored_dtype(run.base_path)},
                "recipes": [r.to_dict() for r in recipes],
                "seeds": {r.name: r.seed for r in recipes}, "versions": _versions(),
                "sessions": (previous or {}).get("sessions", []) + [time.strftime("%Y-%m-%dT%H:%M:%S%z")]}
    _check_same_run(previous, run_meta)
    if previous:
        # Recipes of earlier sessions that this one does not name stay in the record (their cells stay on disk).
        now = {r["name"] for r in run_meta["recipes"]}
        run_meta["recipes"] = [r for r in previous.get("recipes", []) if r["name"] not in now] + run_meta["recipes"]
    _write_json(out / "run.json", run_meta)
    results = {"schema_version": RUN_SCHEMA_VERSION, "run": run_meta, "recipes": {}, "conjecture": {},
               "controls": {"spacing_share": measure.spacing_share(run.base_path)}}
    earlier = json.loads((out / "results.json").read_text()) if held and (out / "results.json").is_file() else {}
    # A --grid session and a sweep session share a run folder: each keeps what the other measured.
    if opts.grid:
        results["recipes"], results["conjecture"] = earlier.get("recipes", {}), earlier.get("conjecture", {})
    elif earlier.get("grid"):
        results["grid"] = earlier["grid"]
    assembling = jobs > 1 and bool(tasks)
    if assembling:
        from rlsparse.lab import parallel

        log(f"running {len(tasks)} tasks on {jobs} worker processes, {worker_threads} torch thread"
            f"{'s' if worker_threads != 1 else ''} each")
        parallel.run_tasks(run, tasks, jobs, worker_threads, log)
        log("assembling the results from the finished cells")
    if opts.grid:
        from rlsparse.lab import grid

        results["grid"] = dict(earlier.get("grid") or {})
        progress = Progress(sum(grid.cells(r, opts.grid_learning_rates) for r in recipes), log, assembling)
        for recipe in recipes:
            log(f"grid {recipe.name} ({recipe.algorithm}): learning rates {recipe.grid['learning_rates']} x "
                f"checkpoints at steps {recipe.grid['checkpoints']}")
            entry = grid.run_grid(run, recipe, progress)
            if entry is not None:  # None: --grid-lrs left this recipe nothing to train and none on disk
                results["grid"][recipe.name] = entry
            _write_json(out / "results.json", results)
    progress = Progress(sum(len(r.learning_rates) * len(r.seeds) for r in recipes) + len(conj), log, assembling)
    for recipe in recipes if not opts.grid else []:
        log(f"recipe {recipe.name} ({recipe.algorithm}, {recipe.data}, family {recipe.family})")
        results["recipes"][recipe.name] = run_recipe(run, recipe, progress)
        _write_json(out / "results.json", results)
    for recipe in conj:
        begun = time.time()
        finished = (out / "conjecture" / recipe.name / "result.json").is_file()
        results["conjecture"][recipe.name] = run_conjecture(run, recipe, results["recipes"][recipe.name])
        if finished:
            progress.skip(f"conjecture 1 on {recipe.name}")
        else:
            progress.finish(f"conjecture 1 on {recipe.name}", time.time() - begun)
        _write_json(out / "results.json", results)
    results["seconds"] = round(time.time() - started, 1)
    _write_json(out / "results.json", results)
    if opts.report:
        from rlsparse.lab.report import render

        html, _ = render(out)
        log(f"report: {html}")
    return out


def _grid_recipes(recipes: list[Recipe], everything: bool, chosen: list[float] | None = None) -> list[Recipe]:
    """The recipes a ``--grid`` run trains: every named one must have a grid; "all"/"real" keep those that do.
    ``chosen`` (``grid_learning_rates``) must each be a learning rate of one of their grids."""
    with_grid = [r for r in recipes if r.grid]
    lacking = [r.name for r in recipes if not r.grid]
    if lacking and not everything:
        raise UsageError(f"--grid: recipes {lacking} have no 'grid' (learning rates x checkpoint steps); "
                         f"name recipes that do ({', '.join(r.name for r in with_grid) or 'none of these'}) or add one")
    if not with_grid:
        raise UsageError("--grid: none of these recipes has a 'grid'; add one to a recipe file")
    from rlsparse.lab.grid import selected

    planned = sorted({lr for r in with_grid for lr in r.grid["learning_rates"]})
    foreign = [lr for lr in chosen or [] if not selected(lr, planned)]
    if foreign:
        raise UsageError(f"--grid-lrs {','.join(f'{lr:g}' for lr in foreign)}: not a learning rate of these recipes' "
                         f"grids ({', '.join(f'{lr:g}' for lr in planned)}); pick from those")
    return with_grid


# What must not change between the sessions of one resumed run: a finished cell measured against
# another base or another test set would be silently mixed with the new ones.
_SAME_ACROSS_SESSIONS = ("base", "real_base", "dataset", "eval_family", "n_test", "style", "test_families",
                         "max_new_tokens", "precision", "preregistration")


def _settled(key: str, value):
    """A run setting as resuming compares it: the pre-registration is its content, not the path it was read from."""
    if key == "preregistration" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "source"}
    return value


def _what_changed(key: str, then, now) -> str:
    if isinstance(then, dict) and isinstance(now, dict):  # name the keys, not two whole documents
        keys = sorted(k for k in set(then) | set(now) if _settled(key, then).get(k) != _settled(key, now).get(k))
        return f"{key}: {', '.join(map(str, keys))} differ"
    return f"{key}: {then!r} then, {now!r} now"


def _check_same_run(previous: dict | None, current: dict) -> None:
    if previous is None:
        return
    changed = [k for k in _SAME_ACROSS_SESSIONS if k in previous and _settled(k, previous[k]) != _settled(k, current[k])]
    if changed:
        diffs = "; ".join(_what_changed(k, previous[k], current[k]) for k in changed)
        raise UsageError(f"cannot resume: the run was started with other settings ({diffs}); "
                         "resume with the same options or start a new --out")
    old = {r["name"]: r for r in previous.get("recipes", [])}
    # Fields a newer rlsparse added to recipes are not a change; every field both sessions know must
    # match, except that a recipe may gain seeds after the ones it had (--seeds 0,1,2 after seed 0):
    # its finished cells stay what they were.
    moved = [r["name"] for r in current["recipes"] if r["name"] in old
             and any(old[r["name"]][k] != v for k, v in cell_fields(r).items() if k in old[r["name"]])]
    shrunk = [r["name"] for r in current["recipes"] if r["name"] in old and "seeds" in old[r["name"]]
              and r["seeds"][:len(old[r["name"]]["seeds"])] != old[r["name"]]["seeds"]]
    if shrunk:
        raise UsageError(f"cannot resume: recipes {shrunk} were started with other seeds "
                         f"({', '.join(str(old[n]['seeds']) for n in shrunk)}); resume with those seeds first "
                         "and any new ones after them (e.g. --seeds 0,1,2 after 0), or start a new --out")
    if moved:
        raise UsageError(f"cannot resume: recipes {moved} changed since the run started (their finished cells "
                         "would mix two settings); restore them or start a new --out")


def apply_suite(opts: LabOptions, suite) -> list[str]:
    """Set a suite's base, tasks and pre-registration on ``opts``; return its recipe names (quick or full)."""
    opts.real_base = suite.base
    opts.style = suite.style
    opts.eval_family = suite.eval_family
    opts.test_families = list(suite.test_families)
    opts.max_new_tokens = suite.max_new_tokens
    opts.n_test = dict(suite.quick_n_test if opts.quick else suite.n_test)
    opts.preregistration = load_preregistration(recipe_dir() / suite.name / suite.preregistration)
    opts.eval_batch, opts.sample_batch = suite.eval_batch, suite.sample_batch
    opts.rank_matrices = suite.rank_matrices
    opts.table4_pairs, opts.table4_declared = list(suite.table4_pairs), suite.table4_declared
    if opts.compute == "auto":
        opts.compute = suite.compute
    if opts.threads is None:
        opts.threads = suite.threads
    if opts.jobs is None:
        # Two workers with one thread each beat one worker with two on these models (measured:
        # two threads give ~1.47x over one), and one thread per worker keeps runs bit-reproducible.
        opts.jobs = "auto"
    return list(suite.quick_recipes if opts.quick else suite.recipes)


def _resolve_jobs(jobs, device: str, runnable: int, run: "_Run", log) -> int:
    if jobs in (None, 1):
        return 1
    from rlsparse.io.checkpoint import Checkpoint
    from rlsparse.lab import parallel

    parameters = sum(t.numel for t in Checkpoint.open(run.base_path).tensors.values()) if jobs == "auto" else None
    available = parallel.available_memory() if parameters else None  # read once: the log says what decided
    chosen = parallel.resolve_jobs(jobs, device, runnable, parameters, available)
    if chosen < parallel.resolve_jobs(jobs, device, runnable):  # only memory can lower it further
        log(f"--jobs auto: {chosen} worker{'s' if chosen > 1 else ''}, as many as "
            f"{available / 1e9:.1f} GB of available memory holds at "
            f"~{parameters * parallel.WORKER_BYTES_PER_PARAMETER / 1e9:.1f} GB each; pass --jobs N to choose")
    return chosen


def resolve_threads(threads: int | str | None) -> int:
    """CPU threads for torch from a ``threads`` setting: a count, "auto" or None (1).

    "auto" is the cores this process may run on (its CPU affinity), at most 16: past that a
    135M-parameter model's matrices are too small for more threads to pay.

    Example:
        >>> resolve_threads("auto") >= 1
        True
    """
    if threads is None:
        return 1
    if threads == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(cores, 16))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads {threads!r}: expected a positive integer or 'auto'")
    return threads


def _stored_dtype(path: Path) -> str | None:
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text())
    return data.get("dtype") or data.get("torch_dtype")


def _link_base(out: Path, base: Path) -> None:
    """``RUN_DIR/base`` points at the model every run started from, so commands can name it."""
    link = out / "base"
    if link.is_symlink() or link.exists():
        return
    try:
        link.symlink_to(Path(base).resolve(), target_is_directory=True)
    except OSError:  # a file system without symlinks: run.json still names the base
        pass


def _require_lab_extras() -> None:
    for module in ("transformers", "trl", "datasets", "accelerate"):
        require(module, "lab")
