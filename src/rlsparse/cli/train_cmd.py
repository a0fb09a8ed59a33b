"""``rlsparse train ALGO``: TRL training, optionally of a subnetwork only (``--mask``).

A thin layer over TRL's own config dataclass and parser (``TrlParser``): every TRL option of the
algorithm works, ``--config file.yaml`` too, plus the options of ``TrainArguments`` below.
``--mask`` omitted = full finetuning through the same code (the fair baseline).

    rlsparse train dpo --model base/ --mask sub.mask.safetensors --dataset prefs.jsonl \\
        --output_dir out/ --learning_rate 5e-7 --verify
    rlsparse train grpo --model base/ --dataset math.jsonl --reward exact_answer --output_dir out/
    rlsparse train sft --help        # every option, TRL's included
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

# Kept in step with rlsparse.train.trainers.ALGORITHMS (a test checks); listed here so that
# building the parser imports neither torch nor TRL.
ALGORITHM_NAMES = ("sft", "dpo", "kto", "grpo", "rloo", "orpo", "cpo", "simpo", "online-dpo", "ppo", "prime")


@dataclass
class TrainArguments:
    """rlsparse's options, parsed beside the algorithm's TRL config."""

    model: str = field(metadata={"help": "Path (or hub id) of the model to finetune: the start of both runs."})
    dataset: str = field(metadata={"help": "Hub id, or a local JSON/JSONL/Parquet/CSV file or folder."})
    mask: str | None = field(default=None, metadata={
        "help": "Mask file from `rlsparse diff --save-mask`: train only its elements. Omit for full finetuning."})
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset to train on."})
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of a hub dataset."})
    reward: list[str] | None = field(default=None, metadata={
        "help": "GRPO/RLOO/OnlineDPO/PPO/PRIME rewards: 'exact_answer' (final answer vs the `answer` column), "
                "'module:function', 'file.py:function', or a reward model path. Repeatable."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16."})
    mask_order: str = field(default="after_clip", metadata={
        "help": "after_clip (the paper's: mask right before the update) or before_clip (clip sees the "
                "subnetwork only; required under DeepSpeed)."})
    mask_weight_decay: str = field(default="mask", metadata={
        "help": "mask: decay only the subnetwork; refuse: fail if weight decay would reach masked-out weights."})
    verify: bool = field(default=False, metadata={
        "help": "At the end, fail unless every masked-out weight is bit-identical to the start."})
    sparse_optimizer: bool = field(default=False, metadata={
        "help": "Use SparseAdamW: optimizer state for the subnetwork only (needs --mask)."})


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on the top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "train", help="finetune with TRL (sft, dpo, grpo, ...), optionally only a subnetwork (--mask)",
        description="Finetune with a TRL trainer. Options after ALGO are TRL's and rlsparse's; "
                    "see `rlsparse train ALGO --help`.")
    parser.add_argument("algo", choices=ALGORITHM_NAMES, help="training algorithm")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="TRL and rlsparse options for ALGO")
    parser.set_defaults(func=run)
    return parser


def make_parser(algo_name: str):
    """The ``TrlParser`` for one algorithm: ``TrainArguments`` and the TRL config class."""
    from trl import TrlParser

    from rlsparse.train.trainers import algorithm

    algo = algorithm(algo_name)
    _, config_cls = algo.classes()
    parser = TrlParser((TrainArguments, config_cls), prog=f"rlsparse train {algo_name}")
    parser.set_defaults(**algo.defaults)  # e.g. simpo = CPO with loss_type="simpo"
    if not _accelerator_available():
        # TRL's configs default to bf16 mixed precision, which transformers refuses without an
        # accelerator; on a CPU-only machine train in the weights' dtype unless asked otherwise.
        parser.set_defaults(bf16=False)
    return parser


def _accelerator_available() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def run(args: argparse.Namespace) -> int:
    """Parse ALGO's options, train, save the model folder; returns the exit code."""
    from rlsparse.errors import UsageError, require

    require("trl", "train")
    from rlsparse.train.trainers import train

    try:
        opts, config = make_parser(args.algo).parse_args_and_config(args.options)
    except ValueError as exc:  # TRL / transformers validate their configs with ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{args.algo} options rejected: {first}; see `rlsparse train {args.algo} --help`") from None
    if opts.mask_order not in ("after_clip", "before_clip"):
        raise UsageError(f"--mask_order {opts.mask_order}: expected after_clip or before_clip")
    if opts.mask_weight_decay not in ("mask", "refuse"):
        raise UsageError(f"--mask_weight_decay {opts.mask_weight_decay}: expected mask or refuse")
    out = train(args.algo, config, opts.model, opts.dataset, mask_path=opts.mask, rewards=opts.reward,
                dataset_split=opts.dataset_split, dataset_config=opts.dataset_config, dtype=opts.dtype,
                order=opts.mask_order, weight_decay=opts.mask_weight_decay, verify=opts.verify,
                sparse_optimizer=opts.sparse_optimizer)
    what = f"subnetwork of {opts.mask}" if opts.mask else "all parameters"
    print(f"trained {what} with {args.algo}; model saved to {out}")
    return 0
