"""Random checkpoint pairs in every dtype, written with the safetensors library, and a
bit-level comparison (the reference reader is safetensors itself)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# code -> (numpy bits type, torch int type of that width, torch dtype)
KINDS = {
    "BF16": (np.int16, torch.int16, torch.bfloat16),
    "F16": (np.int16, torch.int16, torch.float16),
    "F32": (np.int32, torch.int32, torch.float32),
    "F8_E4M3": (np.uint8, torch.uint8, torch.float8_e4m3fn),
    "F8_E5M2": (np.uint8, torch.uint8, torch.float8_e5m2),
    "I64": (np.int64, torch.int64, torch.int64),
}
# a quiet NaN with a payload, a signalling-pattern NaN, -0.0, +0.0 (bits), per width
SPECIALS = {2: [0x7FC3, 0xFF81, 0x8000, 0x0000], 4: [0x7FC00123, 0xFF800001, 0x80000000, 0], 1: [0x7F, 0xFF, 0x80, 0]}


def bits_tensor(bits: np.ndarray, code: str, shape) -> torch.Tensor:
    npt, it, dt = KINDS[code]
    return torch.from_numpy(np.ascontiguousarray(bits).astype(npt, copy=False).copy()).view(it).view(dt).reshape(shape)


def random_bits(rng: np.random.Generator, code: str, n: int, small: bool) -> np.ndarray:
    npt = KINDS[code][0]
    width = np.dtype(npt).itemsize
    if small and code in ("BF16", "F16", "F32"):  # weight-like values: random float32 near 0.02
        v = (rng.standard_normal(n) * 0.02).astype(np.float32)
        return torch.from_numpy(v).to(KINDS[code][2]).view(KINDS[code][1]).numpy()
    return rng.integers(0, 2 ** (8 * width), size=n, dtype=np.uint64).astype(npt) if width < 8 else \
        rng.integers(-2**62, 2**62, size=n, dtype=np.int64)


def change(rng: np.random.Generator, bits: np.ndarray, density: float, ulps: bool) -> np.ndarray:
    out = bits.copy()
    n = out.size
    idx = np.flatnonzero(rng.random(n) < density)
    width = out.dtype.itemsize
    if ulps:
        step = rng.integers(1, 4, size=idx.size) * (1 if rng.random() < 0.5 else -1)
        out[idx] = (out[idx].astype(np.int64) + step).astype(out.dtype)  # wraps in the stored width
    else:
        out[idx] = rng.integers(0, 2**min(62, 8 * width), size=idx.size).astype(out.dtype)
    if n and width in SPECIALS:
        sp = np.array(SPECIALS[width], dtype=np.uint64).astype(np.dtype(f"u{width}")).view(out.dtype)
        where = rng.integers(0, n, size=min(n, 4))
        out[where] = sp[: where.size]
    return out


def write(folder: Path, tensors: dict[str, torch.Tensor], files: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
    return folder


def load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def bits_of(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits_of(a[k]), bits_of(b[k])), k


def config_files() -> dict[str, bytes]:
    return {"config.json": json.dumps({"model_type": "llama", "hidden_size": 8}).encode(),
            "tokenizer.json": json.dumps({"vocab": {chr(97 + i): i for i in range(26)}}).encode()}
