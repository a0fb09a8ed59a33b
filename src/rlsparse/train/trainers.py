"""Which TRL trainer runs each algorithm, and the one function that trains with or without a mask.

Full finetuning (no mask) and subnetwork finetuning go through the same code: the only difference
is the ``MaskCallback`` (and, if asked, ``SparseAdamW``), so the two runs are a fair comparison.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlsparse.errors import UsageError, require
from rlsparse.masks import Mask


@dataclass(frozen=True)
class Algorithm:
    """A TRL trainer and config class, the dataset columns it reads, and config defaults."""

    module: str
    trainer: str
    config: str
    columns: tuple[str, ...]
    uses_rewards: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)

    def classes(self):
        require("trl", "train")
        module = importlib.import_module(self.module)
        return getattr(module, self.trainer), getattr(module, self.config)


ALGORITHMS: dict[str, Algorithm] = {
    "sft": Algorithm("trl", "SFTTrainer", "SFTConfig", ()),
    "dpo": Algorithm("trl", "DPOTrainer", "DPOConfig", ("prompt", "chosen", "rejected")),
    "kto": Algorithm("trl", "KTOTrainer", "KTOConfig", ("prompt", "completion", "label")),
    "grpo": Algorithm("trl", "GRPOTrainer", "GRPOConfig", ("prompt",), uses_rewards=True),
    "rloo": Algorithm("trl", "RLOOTrainer", "RLOOConfig", ("prompt",), uses_rewards=True),
    "orpo": Algorithm("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig", ("prompt", "chosen", "rejected")),
    "cpo": Algorithm("trl.experimental.cpo", "CPOTrainer", "CPOConfig", ("prompt", "chosen", "rejected")),
    # SimPO is CPO's loss_type="simpo"; cpo_alpha=0 drops CPO's extra NLL term (TRL's CPO docs).
    "simpo": Algorithm("trl.experimental.cpo", "CPOTrainer", "CPOConfig", ("prompt", "chosen", "rejected"),
                       defaults={"loss_type": "simpo", "cpo_alpha": 0.0}),
    "online-dpo": Algorithm("trl.experimental.online_dpo", "OnlineDPOTrainer", "OnlineDPOConfig", ("prompt",),
                            uses_rewards=True),
    # TRL 1.16 has no PPO or PRIME trainer: ours, on transformers.Trainer (rlsparse/train/ppo.py, prime.py).
    "ppo": Algorithm("rlsparse.train.ppo", "PPOTrainer", "PPOConfig", ("prompt",), uses_rewards=True),
    "prime": Algorithm("rlsparse.train.prime", "PRIMETrainer", "PRIMEConfig", ("prompt",), uses_rewards=True),
}


def algorithm(name: str) -> Algorithm:
    """The ``Algorithm`` for a command-line name (``sft``, ``dpo``, ``grpo``, ...)."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise UsageError(f"unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}") from None


def load_dataset_from(spec: str, split: str = "train", name: str | None = None):
    """A ``datasets.Dataset`` from a hub id, a JSON/JSONL/Parquet/CSV file, or a folder.

    A folder written by ``Dataset.save_to_disk`` is loaded as such; any other folder goes to
    ``datasets.load_dataset``, which reads the data files in it.

    Example:
        >>> ds = load_dataset_from("data/prefs.jsonl")
    """
    datasets = require("datasets", "train")
    path = Path(spec)
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.is_file():
        builder = builders.get(path.suffix.lower())
        if builder is None:
            raise UsageError(f"--dataset {spec}: unknown file type {path.suffix!r}; expected one of {sorted(builders)}")
        return datasets.load_dataset(builder, data_files=str(path), split=split)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        if (path / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))[split]
        return datasets.load_dataset(str(path), name=name, split=split)
    if path.suffix.lower() in builders or spec.startswith((".", "/")):
        raise UsageError(f"--dataset {spec}: no such file or folder")
    return datasets.load_dataset(spec, name=name, split=split)


def check_columns(algo: Algorithm, dataset, algo_name: str) -> None:
    """Raise UsageError unless ``dataset`` has the columns the algorithm reads."""
    missing = [c for c in algo.columns if c not in dataset.column_names]
    if missing:
        raise UsageError(
            f"{algo_name}: the dataset has columns {dataset.column_names}, missing {missing}; "
            f"{algo_name} reads {list(algo.columns)}"
        )


def build_trainer(algo_name: str, model, config, train_dataset, processing_class, *, mask: Mask | None = None,
                  reward_funcs=None, order: str = "after_clip", weight_decay: str = "mask", verify: bool = False,
                  sparse_optimizer: bool = False, ref_model=None, callbacks=None):
    """A TRL trainer for ``algo_name``, masked to ``mask`` (None = full finetuning, same code path).

    Args:
        algo_name: a key of ``ALGORITHMS``.
        model: a loaded ``PreTrainedModel``.
        config: an instance of the algorithm's TRL config class.
        train_dataset: a ``datasets.Dataset`` in the format the trainer reads.
        processing_class: the tokenizer.
        mask: the subnetwork to train; None trains every parameter.
        reward_funcs: reward callables or model paths (GRPO, RLOO, OnlineDPO).
        order, weight_decay, verify: passed to ``MaskCallback``.
        sparse_optimizer: use ``SparseAdamW`` (state for the subnetwork only) instead of the
            config's optimizer; takes lr, betas, eps and weight decay from ``config``.
        ref_model: the frozen reference model (DPO, KTO, OnlineDPO); None lets TRL load a copy of
            ``model`` from its path.
        callbacks: more ``TrainerCallback`` objects.

    Example:
        >>> trainer = build_trainer("dpo", model, DPOConfig(output_dir="out"), ds, tok, mask=mask)
        >>> trainer.train()
    """
    from rlsparse.train.callback import MaskCallback
    from rlsparse.train.sparse_adamw import SparseAdamW

    algo = algorithm(algo_name)
    trainer_cls, _ = algo.classes()
    check_columns(algo, train_dataset, algo_name)
    kwargs: dict[str, Any] = dict(model=model, args=config, train_dataset=train_dataset,
                                  processing_class=processing_class, callbacks=list(callbacks or []))
    if ref_model is not None:
        kwargs["ref_model"] = ref_model
    if algo.uses_rewards:
        if not reward_funcs:
            raise UsageError(f"{algo_name} needs a reward: pass --reward exact_answer or --reward module:function")
        kwargs["reward_funcs"] = list(reward_funcs)
    elif reward_funcs:
        raise UsageError(f"{algo_name} takes no reward function; --reward is for grpo, rloo, online-dpo, ppo and prime")
    if mask is not None:
        kwargs["callbacks"].append(MaskCallback(mask, order=order, weight_decay=weight_decay, verify=verify))
    if sparse_optimizer and mask is None:
        raise UsageError("--sparse_optimizer needs --mask (without a mask, the dense optimizer is the baseline)")
    trainer = trainer_cls(**kwargs)
    if sparse_optimizer:
        # The trainer's own rule for which parameters decay (not norms, not biases), so the sparse
        # run differs from the dense masked one in optimizer memory only.
        decay = set(trainer.get_decay_parameter_names(model))
        groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and (n in decay) == wants],
                   "weight_decay": config.weight_decay if wants else 0.0} for wants in (True, False)]
        trainer.optimizer = SparseAdamW([g for g in groups if g["params"]], mask, module=model,
                                        lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                        eps=config.adam_epsilon)
    return trainer


def train(algo_name: str, config, model_path: str, dataset: str, *, mask_path: str | None = None,
          rewards: list[str] | None = None, dataset_split: str = "train", dataset_config: str | None = None,
          dtype: str = "auto", order: str = "after_clip", weight_decay: str = "mask", verify: bool = False,
          sparse_optimizer: bool = False) -> Path:
    """Load everything, train, and save the model as a normal HF folder in ``config.output_dir``.

    Inputs are checked before the model trains: the mask file and its fit to the model, the
    dataset's columns, the rewards. A run that fails verification saves no model.

    Example:
        >>> train("grpo", GRPOConfig(output_dir="out"), "base/", "math.jsonl", mask_path="sub.mask.safetensors",
        ...       rewards=["exact_answer"])
    """
    require("transformers", "train")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsparse.train.masking import _check_not_empty, match_parameters
    from rlsparse.train.rewards import BUILTIN, load_reward

    algo = algorithm(algo_name)
    mask = Mask.load(mask_path) if mask_path else None
    if mask is not None:
        _check_not_empty(mask)
    reward_funcs = [load_reward(r) if r in BUILTIN or ":" in r else r for r in rewards or []]
    if not algo.uses_rewards and reward_funcs:
        raise UsageError(f"{algo_name} takes no reward function; --reward is for grpo, rloo, online-dpo, ppo and prime")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype {dtype}: expected auto, float32, bfloat16 or float16")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    if mask is not None:
        match_parameters(model, mask)  # before the dataset is read: a wrong mask fails in seconds
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_dataset = load_dataset_from(dataset, split=dataset_split, name=dataset_config)
    trainer = build_trainer(algo_name, model, config, train_dataset, tokenizer, mask=mask,
                            reward_funcs=reward_funcs, order=order, weight_decay=weight_decay, verify=verify,
                            sparse_optimizer=sparse_optimizer)
    trainer.train()
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
    return Path(config.output_dir)
