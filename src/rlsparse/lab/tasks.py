"""Verifiable synthetic arithmetic tasks: generation, splits, and the exact-answer reward.

Each task family enumerates every problem of its kind (e.g. all 2-digit additions), shuffles
them with a seed and cuts a held-out test split off the front, so train and test are disjoint
and identical on every machine.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Iterable

from rlsparse.errors import UsageError

FAMILIES = ("add", "sub", "mul")
_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem: the prompt the model sees and the exact expected answer.

    Example:
        >>> Problem(prompt="12+34=", answer="46", family="add")
    """

    prompt: str
    answer: str
    family: str

    def to_row(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "family": self.family}


def _operands(family: str, digits: int) -> list[tuple[int, int]]:
    lo, hi = 10 ** (digits - 1), 10**digits
    if family == "add":
        return [(a, b) for a in range(lo, hi) for b in range(lo, hi)]
    if family == "sub":
        return [(a, b) for a in range(lo, hi) for b in range(lo, hi) if a >= b]
    if family == "mul":
        return [(a, b) for a in range(lo, hi) for b in range(2, 10)]
    raise UsageError(f"task family {family!r} is unknown; expected one of {', '.join(FAMILIES)}")


def solve(family: str, a: int, b: int) -> int:
    """The ground-truth result of ``a <op> b`` for a task family."""
    return {"add": a + b, "sub": a - b, "mul": a * b}[family]


def all_problems(family: str, digits: int = 2) -> list[Problem]:
    """Every problem of a family, in a fixed canonical order."""
    if digits < 1 or digits > 4:
        raise UsageError(f"digits={digits} is out of range; expected 1 to 4 (the tiny model's context is short)")
    sym = _SYMBOL.get(family)
    return [Problem(f"{a}{sym}{b}=", str(solve(family, a, b)), family) for a, b in _operands(family, digits)]


def split(family: str, *, seed: int, n_test: int = 200, digits: int = 2) -> tuple[list[Problem], list[Problem]]:
    """Deterministic, disjoint train/test split of a task family.

    Args:
        family: "add", "sub" or "mul".
        seed: Shuffling seed; the same seed gives the same split everywhere.
        n_test: Size of the held-out test split.
        digits: Digits per operand.

    Returns:
        (train, test) lists of Problem.

    Example:
        >>> train, test = split("add", seed=0)
        >>> len(set(p.prompt for p in train) & set(p.prompt for p in test))
        0
    """
    problems = all_problems(family, digits)
    if n_test >= len(problems):
        raise UsageError(f"n_test={n_test} leaves no training problems ({family} has {len(problems)}); lower n_test")
    rng = random.Random(f"{family}:{digits}:{seed}")
    order = list(range(len(problems)))
    rng.shuffle(order)
    shuffled = [problems[i] for i in order]
    return shuffled[n_test:], shuffled[:n_test]


def extract_answer(completion) -> str:
    """The answer part of a completion: text before the first whitespace, '=' or end of text.

    Accepts a string or a conversational completion (list of {"role", "content"} dicts), as TRL
    passes either to reward functions.
    """
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    text = completion.strip()
    for stop in (" ", "\n", "="):
        text = text.split(stop, 1)[0]
    return text


def reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """Exact-answer reward, usable directly as a TRL GRPO reward function.

    TRL passes the dataset's extra columns as keyword arguments, so a dataset with an
    ``answer`` column gets it here.

    Args:
        completions: Generated completions (strings or conversational message lists).
        answer: The expected answers, one per completion.

    Returns:
        1.0 where the completion's answer equals the expected answer exactly, else 0.0.

    Example:
        >>> reward(["46", "47", " 46 "], answer=["46", "46", "46"])
        [1.0, 0.0, 1.0]
    """
    if len(completions) != len(answer):
        raise UsageError(f"reward got {len(completions)} completions but {len(answer)} answers; pass one answer each")
    return [1.0 if extract_answer(c) == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


def load_jsonl(path: str | os.PathLike) -> list[Problem]:
    """Read real data: a local JSONL file with one {"prompt": ..., "answer": ...} object a line."""
    rows, bad = [], []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    rows.append(Problem(str(obj["prompt"]), str(obj["answer"]), str(obj.get("family", "jsonl"))))
                except (json.JSONDecodeError, KeyError, TypeError):
                    bad.append(lineno)
    except OSError as exc:
        raise UsageError(f"dataset {path} cannot be read ({exc.strerror}); pass a JSONL file with prompt/answer") from None
    if bad:
        raise UsageError(f"dataset {path}: lines {bad[:5]} are not JSON objects with 'prompt' and 'answer'; fix them")
    if not rows:
        raise UsageError(f"dataset {path} is empty; expected JSONL lines with 'prompt' and 'answer'")
    return rows


def rows(problems: Iterable[Problem]) -> list[dict]:
    """Problems as dataset rows (prompt, answer, family columns)."""
    return [p.to_row() for p in problems]
