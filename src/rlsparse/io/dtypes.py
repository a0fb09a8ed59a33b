"""Safetensors dtype codes: sizes, torch dtypes, and the unsigned view used for bit compares."""

from __future__ import annotations

import numpy as np
import torch

# code -> (bytes per element, torch dtype)
_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "BOOL": (1, torch.bool),
    "U8": (1, torch.uint8),
    "I8": (1, torch.int8),
    "I16": (2, torch.int16),
    "U16": (2, torch.uint16),
    "I32": (4, torch.int32),
    "U32": (4, torch.uint32),
    "I64": (8, torch.int64),
    "U64": (8, torch.uint64),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "F32": (4, torch.float32),
    "F64": (8, torch.float64),
    "F8_E4M3": (1, torch.float8_e4m3fn),
    "F8_E5M2": (1, torch.float8_e5m2),
}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
_BY_TORCH = {dt: code for code, (_, dt) in _DTYPES.items()}


def known(code: str) -> bool:
    return code in _DTYPES


def itemsize(code: str) -> int:
    return _DTYPES[code][0]


def torch_dtype(code: str) -> torch.dtype:
    return _DTYPES[code][1]


def code_of(dtype: torch.dtype) -> str:
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors code") from None


def uint_view(code: str):
    """The unsigned numpy integer type with the same width as ``code`` (for bit compares)."""
    return _UINT[itemsize(code)]


def parse_user_dtype(text: str) -> str:
    """Map 'bf16', 'bfloat16', 'fp32', 'float16', 'F32'... to a safetensors code."""
    aliases = {
        "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "f16": "F16", "float16": "F16",
        "half": "F16", "fp32": "F32", "f32": "F32", "float32": "F32", "float": "F32",
        "fp64": "F64", "float64": "F64", "f64": "F64",
    }
    code = aliases.get(text.lower(), text.upper())
    if code not in FLOAT_CODES:
        raise ValueError(text)
    return code


def widen(raw: np.ndarray, code: str) -> np.ndarray:
    """Stored values (as their unsigned bit pattern) -> float32 (float64 for F64), exactly."""
    if code == "BF16":
        return np.left_shift(raw, 16, dtype=np.uint32).view(np.float32)
    if code == "F32":
        return raw.view(np.float32)
    if code == "F16":
        return raw.view(np.float16).astype(np.float32)
    if code == "F64":
        return raw.view(np.float64)
    if code in ("F8_E4M3", "F8_E5M2"):
        t = torch.from_numpy(np.ascontiguousarray(raw)).view(torch_dtype(code))
        return t.to(torch.float32).numpy()
    return raw.view(np.dtype(str(torch_dtype(code)).replace("torch.", ""))).astype(np.float64)


def nonfinite_counts(raw: np.ndarray, code: str) -> tuple[int, int]:
    """(NaN count, Inf count) of stored values, from their bits where that is cheap."""
    if code == "BF16":
        exp_all = (raw & 0x7F80) == 0x7F80
        n = int(np.count_nonzero(exp_all))
        if not n:
            return 0, 0
        inf = int(np.count_nonzero((raw & 0x7FFF) == 0x7F80))
        return n - inf, inf
    if code == "F32":
        exp_all = (raw & 0x7F800000) == 0x7F800000
        n = int(np.count_nonzero(exp_all))
        if not n:
            return 0, 0
        inf = int(np.count_nonzero((raw & 0x7FFFFFFF) == 0x7F800000))
        return n - inf, inf
    if code == "F8_E4M3":  # e4m3fn: no infinities, NaN is S.1111.111
        return int(np.count_nonzero((raw & 0x7F) == 0x7F)), 0
    if code in FLOAT_CODES:
        v = widen(raw, code)
        nan = int(np.count_nonzero(np.isnan(v)))
        return nan, int(np.count_nonzero(np.isinf(v)))
    return 0, 0
