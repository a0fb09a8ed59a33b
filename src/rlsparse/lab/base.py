"""The lab's "pretrained base": a tiny Llama trained from scratch on arithmetic, cached on disk.

The base is trained in fp32 and saved in bfloat16 (the paper's setting) as a normal Hugging Face
folder (``config.json``, ``model.safetensors``, tokenizer files), so every tool treats it like a
downloaded model. Its folder name carries a hash of its config: the same config is built once.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlsparse.errors import CheckpointError, UsageError
from rlsparse.io.atomic import atomic_path

BASE_SCHEMA_VERSION = 1


@dataclass
class BaseConfig:
    """How the tiny base model is built and pretrained (everything that changes its weights).

    Example:
        >>> BaseConfig(steps=600).hash()[:8]
    """

    families: list[str] = field(default_factory=lambda: ["add"])
    digits: int = 2
    n_test: int = 1000
    n_val: int = 200
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    steps: int = 800
    target_accuracy: float = 0.5
    eval_every: int = 10
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_dtype: str = "bfloat16"
    schema_version: int = BASE_SCHEMA_VERSION

    def hash(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def with_overrides(self, pairs: list[str]) -> "BaseConfig":
        """This config with ``key=value`` overrides (e.g. ``hidden_size=256``), typed like the field."""
        import dataclasses

        fields = {f.name: f for f in dataclasses.fields(self)}
        changes, bad = {}, []
        for pair in pairs:
            key, _, value = pair.partition("=")
            current = getattr(self, key, None)
            if key not in fields or key == "schema_version" or not value:
                bad.append(pair)
            elif isinstance(current, list):
                changes[key] = [v for v in value.split(",") if v]
            else:
                try:
                    changes[key] = type(current)(value)
                except ValueError:
                    bad.append(pair)
        if bad:
            names = ", ".join(k for k in fields if k != "schema_version")
            raise UsageError(f"--base {' '.join(bad)}: not KEY=VALUE with a known key and value; keys: {names}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict) -> "BaseConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def default_cache_dir() -> Path:
    """``$RLSPARSE_LAB_CACHE`` or ``~/.cache/rlsparse/lab``."""
    env = os.environ.get("RLSPARSE_LAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rlsparse" / "lab"


def build_model(cfg: BaseConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    """A freshly initialised ``LlamaForCausalLM`` of the configured (tiny) size, in fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_heads, max_position_embeddings=64, pad_token_id=pad_id,
                         bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def save_model(model, tokenizer, path: str | os.PathLike, dtype: str = "bfloat16", meta: dict | None = None) -> None:
    """Save a model and tokenizer as an HF folder, atomically (temp folder, then rename).

    The model is cast on a copy so the caller's fp32 master weights are untouched.
    """
    import copy

    import torch

    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if dtype not in dtypes:
        raise UsageError(f"checkpoint dtype {dtype!r} is not supported; use 'bfloat16' or 'float32'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = copy.deepcopy(model).to(dtypes[dtype])
    saved.config.dtype = dtype
    with atomic_path(path, folder_output=True) as tmp:
        saved.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if meta is not None:
            (tmp / "rlsparse_lab.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_model(path: str | os.PathLike, device: str = "cpu", weights: str = "float32"):
    """Load an HF causal LM folder (fp32 master weights by default, or pure bf16), plus its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; expected a Hugging Face model folder (save_pretrained)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, weights)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def accuracy(model, tokenizer, problems, batch_size: int = 256, max_new_tokens: int = 6,
             shared_prefix: bool = True) -> float:
    """Greedy-decoding exact-answer accuracy on a list of Problem (``greedy_answers`` scored by ``reward``)."""
    from rlsparse.lab.tasks import reward

    if not problems:
        return float("nan")
    texts = greedy_answers(model, tokenizer, problems, batch_size, max_new_tokens, shared_prefix=shared_prefix)
    return sum(reward(texts, answer=[p.answer for p in problems], style=[p.style for p in problems])) / len(problems)


# A shared prefix shorter than this is not worth a separate forward.
_MIN_SHARED_PREFIX = 8


def greedy_answers(model, tokenizer, problems, batch_size: int = 256, max_new_tokens: int = 6,
                   shared_prefix: bool = True) -> list[str]:
    """The greedy replies to each problem's prompt (special tokens dropped), in batches.

    With ``shared_prefix``, the token prefix every prompt of a batch shares (a chat template's
    system prompt: ~30 of ~45 tokens on the real base) is run once and its key/value cache reused by
    the whole batch, instead of once per prompt. Prompts keep their positions (the padding moves
    between the prefix and the rest, masked), so the replies are those of the plain path; the lab's
    tests check that they are identical.
    """
    import torch

    from rlsparse.lab.tasks import encode_prompts

    model.eval()
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    texts: list[str] = []
    with torch.no_grad():
        for start in range(0, len(problems), batch_size):
            enc = encode_prompts(problems[start:start + batch_size], tokenizer, device)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            moved = _prefix_cached(model, enc, tokenizer.pad_token_id) if shared_prefix else None
            out = model.generate(**(moved or enc), **kwargs)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def _prefix_cached(model, enc, pad_id: int) -> dict | None:
    """Generation inputs with the batch's shared token prefix precomputed, or None if it is too short.

    The left-padded rows ``[pads][prefix][rest]`` become ``[prefix][pads][rest]`` (same width,
    same attention mask count, so every token keeps its position id), and ``past_key_values``
    holds the prefix's cache, computed once and repeated over the batch.
    """
    import torch

    ids, att = enc["input_ids"], enc["attention_mask"]
    batch, width = ids.shape
    lengths = att.sum(1).tolist()
    if any(att[i, width - n:].min() == 0 for i, n in enumerate(lengths)):
        return None  # not plain left padding
    shortest = min(lengths)
    heads = torch.stack([ids[i, width - n:width - n + shortest] for i, n in enumerate(lengths)])
    same = (heads == heads[:1]).all(0)
    # at least one token of every prompt stays out of the cache: generation needs an input to start from
    shared = int(same.long().cumprod(0).sum().clamp(max=shortest - 1))
    if shared < _MIN_SHARED_PREFIX:
        return None
    prefix = heads[0, :shared]
    with torch.no_grad():
        out = model(input_ids=prefix[None], use_cache=True, logits_to_keep=1)
    # transformers 5 names the cache "cache" (its old name "past_key_values" warns); 4.x only has the old one
    key = "cache" if "cache" in out else "past_key_values"
    cache = out[key]
    cache.batch_repeat_interleave(batch)
    new_ids = torch.full_like(ids, pad_id)
    new_att = torch.zeros_like(att)
    new_ids[:, :shared] = prefix
    new_att[:, :shared] = 1
    for i, n in enumerate(lengths):
        rest = n - shared
        new_ids[i, width - rest:] = ids[i, width - rest:]
        new_att[i, width - rest:] = 1
    return {"input_ids": new_ids, "attention_mask": new_att, key: cache}


def _batches(cfg: BaseConfig, tokenizer):
    """An endless stream of (input_ids, attention_mask, labels) from the pretraining corpus."""
    corpus = [p for fam in cfg.families for p in _train_val(cfg, fam)[0]]
    rng = random.Random(cfg.seed)
    tokenizer.padding_side = "right"
    try:
        while True:
            chunk = rng.sample(corpus, min(cfg.batch_size, len(corpus)))
            texts = [p.prompt + p.answer + tokenizer.eos_token for p in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True)
            labels = enc["input_ids"].clone()
            labels[enc["attention_mask"] == 0] = -100
            # Loss on the answer only: the operands are random digits, nothing to learn there.
            for row, p in enumerate(chunk):
                labels[row, :len(tokenizer(p.prompt)["input_ids"])] = -100
            yield enc["input_ids"], enc["attention_mask"], labels
    finally:
        tokenizer.padding_side = "left"


def _train_val(cfg: BaseConfig, family: str):
    """The family's train split minus a validation slice used only to decide when to stop."""
    from rlsparse.lab.tasks import split

    train, _ = split(family, seed=cfg.seed, n_test=cfg.n_test, digits=cfg.digits)
    return train[cfg.n_val:], train[:cfg.n_val]


def pretrain(cfg: BaseConfig, out: str | os.PathLike, device: str = "cpu", progress=None) -> dict:
    """Train the tiny model from scratch on the task corpus and save it (plain PyTorch loop).

    Args:
        cfg: The base config (size, corpus, optimiser, seed).
        out: The HF folder to write.
        device: "cpu" or "cuda".
        progress: Optional callable ``progress(step, total, loss)``.

    Returns:
        The metadata written to ``rlsparse_lab.json`` (config, held-out accuracy, wall time).
    """
    import torch

    from rlsparse.lab.tasks import split
    from rlsparse.lab.tokenizer import build_tokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    model = build_model(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                        tokenizer.eos_token_id).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    val = [p for fam in cfg.families for p in _train_val(cfg, fam)[1]]
    val_acc, stopped = None, cfg.steps
    start = time.time()
    model.train()
    losses = []
    batches = _batches(cfg, tokenizer)
    for step in range(cfg.steps):
        ids, att, labels = (t.to(device) for t in next(batches))
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, cfg.steps, losses[-1])
        # Stop once the model is right part of the time, leaving room for RL to improve it.
        if cfg.target_accuracy < 1 and (step + 1) % cfg.eval_every == 0:
            val_acc = accuracy(model, tokenizer, val)
            model.train()
            if val_acc >= cfg.target_accuracy:
                stopped = step + 1
                break
    batches.close()
    train_s = time.time() - start
    # Accuracy of the checkpoint as saved (bf16 by default), which is what every finetune starts from.
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    model = model.to(dtypes.get(cfg.checkpoint_dtype, torch.float32)).float()
    acc = {fam: accuracy(model, tokenizer, split(fam, seed=cfg.seed, n_test=cfg.n_test, digits=cfg.digits)[1])
           for fam in sorted(set(cfg.families) | {"add", "sub"})}
    meta = {"schema_version": BASE_SCHEMA_VERSION, "kind": "rlsparse-lab-base", "config": asdict(cfg),
            "config_hash": cfg.hash(), "test_accuracy": acc, "train_seconds": round(train_s, 2),
            "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "steps_trained": stopped, "validation_accuracy": val_acc,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "precision": {"training": "float32", "checkpoint": cfg.checkpoint_dtype}, "device": device}
    save_model(model, tokenizer, out, dtype=cfg.checkpoint_dtype, meta=meta)
    return meta


def ensure_base(cfg: BaseConfig | None = None, cache_dir: str | os.PathLike | None = None, device: str = "cpu",
                progress=None) -> Path:
    """The cached base for ``cfg``, built first if missing.

    Args:
        cfg: Base config; default BaseConfig().
        cache_dir: Where bases live; default ``~/.cache/rlsparse/lab`` (or $RLSPARSE_LAB_CACHE).
        device: Device for pretraining if the base must be built.
        progress: Optional progress callable, see pretrain().

    Returns:
        Path of the HF folder ``<cache_dir>/base-<hash of config>``.

    Example:
        >>> path = ensure_base(BaseConfig(steps=600))
    """
    cfg = cfg or BaseConfig()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"base-{cfg.hash()}"
    if (path / "rlsparse_lab.json").is_file() and (path / "config.json").is_file():
        return path
    pretrain(cfg, path, device=device, progress=progress)
    return path


def base_metadata(path: str | os.PathLike) -> dict | None:
    """The lab metadata of a base folder, or None for a model the lab did not build."""
    meta = Path(path) / "rlsparse_lab.json"
    return json.loads(meta.read_text()) if meta.is_file() else None
