"""Safetensors dtype codes: sizes, torch dtypes, and the unsigned view used for bit compares."""

from __future__ import annotations

import numpy as np

# Kept free of torch at import time: `rlsparse diff` never needs it (start-up is ~1.5 s faster).
# code -> (bytes per element, torch dtype name, numpy dtype for integer codes)
_DTYPES: dict[str, tuple[int, str, object]] = {
    "BOOL": (1, "bool", np.bool_),
    "U8": (1, "uint8", np.uint8),
    "I8": (1, "int8", np.int8),
    "I16": (2, "int16", np.int16),
    "U16": (2, "uint16", np.uint16),
    "I32": (4, "int32", np.int32),
    "U32": (4, "uint32", np.uint32),
    "I64": (8, "int64", np.int64),
    "U64": (8, "uint64", np.uint64),
    "F16": (2, "float16", np.float16),
    "BF16": (2, "bfloat16", None),
    "F32": (4, "float32", np.float32),
    "F64": (8, "float64", np.float64),
    "F8_E4M3": (1, "float8_e4m3fn", None),
    "F8_E5M2": (1, "float8_e5m2", None),
}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
FP8_BLOCK = 128  # block-scaled FP8 (DeepSeek-V3 style): one scale per 128 x 128 block of a matrix
FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


def known(code: str) -> bool:
    return code in _DTYPES


def itemsize(code: str) -> int:
    return _DTYPES[code][0]


def torch_dtype(code: str):
    import torch

    return getattr(torch, _DTYPES[code][1])


def code_of(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    for code, (_, tname, _) in _DTYPES.items():
        if tname == name:
            return code
    raise ValueError(f"dtype {dtype} has no safetensors code")


def _fp8_table(exp_bits: int, man_bits: int, bias: int, ieee_specials: bool) -> np.ndarray:
    """float32 value of each of the 256 bit patterns of an FP8 format (exact)."""
    out = np.empty(256, dtype=np.float32)
    for bits in range(256):
        sign = -1.0 if bits & 0x80 else 1.0
        e = (bits >> man_bits) & ((1 << exp_bits) - 1)
        m = bits & ((1 << man_bits) - 1)
        top = (1 << exp_bits) - 1
        if ieee_specials and e == top:
            v = float("inf") if m == 0 else float("nan")
        elif not ieee_specials and e == top and m == (1 << man_bits) - 1:
            v = float("nan")  # e4m3fn: only S.1111.111 is NaN, no infinities
        elif e == 0:
            v = m / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            v = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
        out[bits] = sign * v
    return out


_FP8 = {"F8_E4M3": _fp8_table(4, 3, 7, False), "F8_E5M2": _fp8_table(5, 2, 15, True)}


def round_to(values: np.ndarray, code: str) -> np.ndarray:
    """Round float32 values to ``code`` (nearest-even, as torch's casts do), widened back."""
    if code in ("F32", "F64"):
        return values
    if code == "F16":
        with np.errstate(over="ignore"):  # out-of-range values become +-inf, as in torch
            return values.astype(np.float16).astype(np.float32)
    if code == "BF16":
        u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        rounded = np.where(nan, (u | 0x00400000) & 0xFFFF0000, rounded).astype(np.uint32)
        return rounded.view(np.float32)
    raise ValueError(f"cannot round to {code}")


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
    if code in _FP8:
        return _FP8[code][raw]
    return raw.view(_DTYPES[code][2]).astype(np.float64)


def nonfinite_counts(raw: np.ndarray, code: str) -> tuple[int, int]:
    """(NaN count, Inf count) of stored values, from their bits where that is cheap.

    A single masked max first answers "are there any?" (almost always no); counting happens
    only when there are.
    """
    spec = _NONFINITE.get(code)
    if spec is not None:
        magnitude, exp_all = spec
        if raw.size == 0:
            return 0, 0
        mag = np.bitwise_and(raw, magnitude)
        if mag.max() < exp_all:
            return 0, 0
        nonfinite = int(np.count_nonzero(mag >= exp_all))
        inf = int(np.count_nonzero(mag == exp_all)) if code != "F8_E4M3" else 0
        return nonfinite - inf, inf
    if code in FLOAT_CODES:
        v = widen(raw, code)
        nan = int(np.count_nonzero(np.isnan(v)))
        return nan, int(np.count_nonzero(np.isinf(v)))
    return 0, 0


# code -> (mask of the magnitude bits, smallest magnitude with all exponent bits set);
# e4m3fn has no infinities and one NaN magnitude (0x7F)
_NONFINITE = {
    "BF16": (0x7FFF, 0x7F80),
    "F16": (0x7FFF, 0x7C00),
    "F32": (0x7FFFFFFF, 0x7F800000),
    "F8_E4M3": (0x7F, 0x7F),
    "F8_E5M2": (0x7F, 0x7C),
}
