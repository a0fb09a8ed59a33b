"""Reward functions for GRPO / RLOO / OnlineDPO: a built-in verifiable-answer reward, or your own.

A reward function follows TRL's convention: called with ``prompts``, ``completions`` and every
other dataset column as keyword lists, it returns one float per completion.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from typing import Callable

from rlsparse.errors import UsageError

BUILTIN = ("exact_answer",)

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_ANSWER_IS = re.compile(r"(?:answer is|answer:)\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _text(completion) -> str:
    # conversational completions are lists of messages; the answer is in the last one
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def final_answer(text: str) -> str:
    """The final answer a text states, normalised for comparison.

    Looked for in this order: the last ``\\boxed{...}``, the text after the last ``####`` (GSM8K),
    after the last "answer is" / "answer:", else the last number.

    Example:
        >>> final_answer("so 3 + 4 = 7. The answer is 7.")
        '7'
    """
    boxed = _BOXED.findall(text)
    if boxed:
        found = boxed[-1]
    elif "####" in text:
        found = text.rsplit("####", 1)[1]
    elif _ANSWER_IS.search(text):
        found = _ANSWER_IS.findall(text)[-1]
    else:
        numbers = _NUMBER.findall(text)
        found = numbers[-1] if numbers else text
    found = found.strip().strip("$").rstrip(".").strip()
    if _NUMBER.fullmatch(found):
        found = found.replace(",", "")
    return found


def exact_answer(completions, answer, **kwargs) -> list[float]:
    """1.0 where a completion's final answer equals the ``answer`` column, else 0.0.

    Example:
        >>> exact_answer(completions=["... #### 42"], answer=["42"])
        [1.0]
    """
    return [float(final_answer(_text(c)) == final_answer(str(a))) for c, a in zip(completions, answer)]


def load_reward(spec: str) -> Callable:
    """A reward function from ``"exact_answer"``, ``"package.module:function"`` or ``"path/file.py:function"``.

    Example:
        >>> load_reward("exact_answer")([" 4"], answer=["4"])
        [1.0]
    """
    if spec in BUILTIN:
        return exact_answer
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"reward {spec!r}: expected 'exact_answer', 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or not path.is_file():
                raise ImportError(f"no such file {path}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"reward {spec!r}: cannot import {module_name} ({exc}); check the path or PYTHONPATH") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise UsageError(f"reward {spec!r}: {module_name} has no function {attr!r}")
    return func
