"""Verifiable synthetic arithmetic tasks: generation, splits, and the exact-answer reward.

Each task family enumerates every problem of its kind (e.g. all 2-digit additions), shuffles
them with a seed and cuts a held-out test split off the front, so train and test are disjoint
and identical on every machine.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Iterable

from rlsparse.errors import UsageError

FAMILIES = ("add", "sub", "mul")
_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
# Prompt styles: "plain" is the tiny base's "12+34=" (the answer is the completion's first word);
# "chat" is a question for an instruction-tuned model, sent through its chat template (the answer
# is the last number of the reply).
STYLES = ("plain", "chat")
_QUESTION = "What is {a} {sym} {b}? Reply with just the number."
_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem: the prompt the model sees and the exact expected answer.

    Example:
        >>> Problem(prompt="12+34=", answer="46", family="add")
    """

    prompt: str
    answer: str
    family: str
    style: str = "plain"

    def to_row(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "family": self.family, "style": self.style}


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


def all_problems(family: str, digits: int = 2, style: str = "plain") -> list[Problem]:
    """Every problem of a family, in a fixed canonical order, with prompts in ``style``."""
    if digits < 1 or digits > 4:
        raise UsageError(f"digits={digits} is out of range; expected 1 to 4 (the tiny model's context is short)")
    if style not in STYLES:
        raise UsageError(f"prompt style {style!r} is unknown; expected one of {', '.join(STYLES)}")
    sym = _SYMBOL.get(family)
    ops = _operands(family, digits)
    if style == "chat":
        return [Problem(_QUESTION.format(a=a, sym=sym, b=b), str(solve(family, a, b)), family, "chat") for a, b in ops]
    return [Problem(f"{a}{sym}{b}=", str(solve(family, a, b)), family) for a, b in ops]


def split(family: str, *, seed: int, n_test: int = 200, digits: int = 2,
          style: str = "plain") -> tuple[list[Problem], list[Problem]]:
    """Deterministic, disjoint train/test split of a task family.

    Args:
        family: "add", "sub" or "mul".
        seed: Shuffling seed; the same seed gives the same split everywhere.
        n_test: Size of the held-out test split.
        digits: Digits per operand.
        style: "plain" prompts (``12+34=``) or "chat" questions; the split is the same for both.

    Returns:
        (train, test) lists of Problem.

    Example:
        >>> train, test = split("add", seed=0)
        >>> len(set(p.prompt for p in train) & set(p.prompt for p in test))
        0
    """
    problems = all_problems(family, digits, style)
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


def extract_number(completion) -> str:
    """The last integer in a completion (commas in numbers ignored), or "" if it has none.

    Example:
        >>> extract_number("63 + 59 = 122.")
        '122'
    """
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    found = _NUMBER.findall(completion.replace(",", ""))
    return found[-1] if found else ""


def answer_of(completion, style: str = "plain") -> str:
    """The answer a completion gives, read the way its prompt style asks for."""
    return extract_number(completion) if style == "chat" else extract_answer(completion)


def reward(completions: list, answer: list[str], style: list[str] | None = None, **kwargs) -> list[float]:
    """Exact-answer reward, usable directly as a TRL GRPO reward function.

    TRL passes the dataset's extra columns as keyword arguments, so a dataset with an
    ``answer`` column gets it here.

    Args:
        completions: Generated completions (strings or conversational message lists).
        answer: The expected answers, one per completion.
        style: Optional prompt style per completion ("chat": the last number of the reply counts).

    Returns:
        1.0 where the completion's answer equals the expected answer exactly, else 0.0.

    Example:
        >>> reward(["46", "47", " 46 "], answer=["46", "46", "46"])
        [1.0, 0.0, 1.0]
    """
    if len(completions) != len(answer):
        raise UsageError(f"reward got {len(completions)} completions but {len(answer)} answers; pass one answer each")
    styles = style if style is not None else ["plain"] * len(answer)
    return [1.0 if answer_of(c, s) == str(a).strip() else 0.0 for c, a, s in zip(completions, answer, styles)]


def prompt_texts(problems: list[Problem], tokenizer) -> list[str]:
    """The exact text a model is given for each problem: chat prompts through the tokenizer's template."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True,
                                          tokenize=False) if p.style == "chat" else p.prompt for p in problems]


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


def encode_prompts(problems: list[Problem], tokenizer, device="cpu"):
    """Left-padded input tensors for generation; chat prompts already hold their special tokens."""
    chat = any(p.style == "chat" for p in problems)
    tokenizer.padding_side = "left"
    return tokenizer(prompt_texts(problems, tokenizer), return_tensors="pt", padding=True,
                     add_special_tokens=not chat).to(device)
