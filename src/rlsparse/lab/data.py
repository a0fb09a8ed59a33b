"""Training data for each recipe: ground-truth SFT rows, the policy's own samples (RFT, DPO
pairs, KTO labels), constructed out-of-distribution pairs, and prompts for the on-policy trainers.

Policy samples are drawn with a fixed seed, so the same base and seed give the same data. Chat
problems (the real base) become TRL's conversational rows: lists of ``{"role", "content"}``
messages that TRL sends through the tokenizer's chat template, as the evaluation does.
"""

from __future__ import annotations

import random
import re

from rlsparse.lab.tasks import Problem, answer_of


def _prompt(p: Problem):
    return [{"role": "user", "content": p.prompt}] if p.style == "chat" else p.prompt


def _reply(p: Problem, text: str):
    return [{"role": "assistant", "content": text}] if p.style == "chat" else text


def _kept(p: Problem, text: str) -> str:
    """What of a sample becomes training text: the whole reply (chat) or the answer word (plain)."""
    return text.strip() if p.style == "chat" else answer_of(text, p.style)


def sft_rows(problems: list[Problem]) -> list[dict]:
    """Prompt/completion rows with the ground-truth answer alone (TRL appends EOS)."""
    return [{"prompt": _prompt(p), "completion": _reply(p, p.answer)} for p in problems]


def sample(model, tokenizer, problems: list[Problem], n: int, *, seed: int, temperature: float = 1.0,
           max_new_tokens: int = 6, batch_size: int = 256) -> list[list[str]]:
    """``n`` sampled completions per problem (``batch_size`` problems at a time) from the model."""
    import torch

    from rlsparse.lab.tasks import encode_prompts

    torch.manual_seed(seed)
    model.eval()
    device = next(model.parameters()).device
    out: list[list[str]] = []
    with torch.no_grad():
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            enc = encode_prompts(chunk, tokenizer, device)
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 num_return_sequences=n, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out.extend(texts[i * n:(i + 1) * n] for i in range(len(chunk)))
    return out


def rft_rows(problems: list[Problem], samples: list[list[str]]) -> list[dict]:
    """Rejection-sampling finetuning data: the policy's own correct samples (one per problem)."""
    rows = []
    for p, texts in zip(problems, samples):
        good = [t for t in texts if answer_of(t, p.style) == p.answer]
        if good:
            rows.append({"prompt": _prompt(p), "completion": _reply(p, _kept(p, good[0]))})
    return rows


def policy_pairs(problems: list[Problem], samples: list[list[str]]) -> list[dict]:
    """In-distribution DPO pairs: chosen and rejected both sampled from the policy.

    Chosen is a correct sample, rejected a wrong one; problems where the policy was always
    right or always wrong give no pair.
    """
    rows = []
    for p, texts in zip(problems, samples):
        good = [t for t in texts if answer_of(t, p.style) == p.answer]
        bad = [t for t in texts if answer_of(t, p.style) != p.answer and answer_of(t, p.style)]
        if good and bad:
            rows.append({"prompt": _prompt(p), "chosen": _reply(p, _kept(p, good[0])),
                         "rejected": _reply(p, _kept(p, bad[0]))})
    return rows


def kto_rows(problems: list[Problem], samples: list[list[str]]) -> list[dict]:
    """KTO's unpaired data: every distinct answer the policy sampled, labelled desirable when correct."""
    rows = []
    for p, texts in zip(problems, samples):
        kept = dict.fromkeys(_kept(p, t) for t in texts if answer_of(t, p.style))
        for text in kept:
            rows.append({"prompt": _prompt(p), "completion": _reply(p, text),
                         "label": answer_of(text, p.style) == p.answer})
    return rows


def constructed_pairs(problems: list[Problem], *, seed: int) -> list[dict]:
    """Out-of-distribution DPO pairs, written by a procedure other than the policy.

    Chosen is the ground truth; rejected is the ground truth with one digit changed.
    """
    rng = random.Random(seed)
    rows = []
    for p in problems:
        digits = list(p.answer.lstrip("-"))
        sign = "-" if p.answer.startswith("-") else ""
        i = rng.randrange(len(digits))
        choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0" and len(digits) > 1)]
        digits[i] = rng.choice(choices)
        rows.append({"prompt": _prompt(p), "chosen": _reply(p, p.answer), "rejected": _reply(p, sign + "".join(digits))})
    return rows


def grpo_rows(problems: list[Problem]) -> list[dict]:
    """Prompt/answer rows for on-policy RL: TRL passes ``answer`` and ``style`` to the reward function."""
    return [{"prompt": _prompt(p), "answer": p.answer, "style": p.style} for p in problems]


def random_rejected_pairs(problems: list[Problem], samples: list[list[str]], *, seed: int) -> list[dict]:
    """DPO pairs whose chosen side is the policy's own correct sample and whose rejected side is a
    random wrong number of the same length: only the rejected answer's likelihood differs from
    ``policy_pairs`` (the same problems keep a pair exactly when the policy was right at least once).
    """
    rng = random.Random(seed)
    rows = []
    for p, texts in zip(problems, samples):
        good = [t for t in texts if answer_of(t, p.style) == p.answer]
        if not good:
            continue
        lo = 10 ** (len(p.answer) - 1) if len(p.answer) > 1 else 0
        while True:
            wrong = str(rng.randrange(lo, 10 ** len(p.answer)))
            if wrong != p.answer:
                break
        rows.append({"prompt": _prompt(p), "chosen": _reply(p, _kept(p, good[0])), "rejected": _reply(p, wrong)})
    return rows


def reformat(answer: str) -> str:
    """An answer in a format the tiny base never writes: its digits reversed ("46" -> "64")."""
    return answer[::-1]


def reformat_reply(text: str) -> str:
    """A chat reply in a notation the real base never writes: every number's digits reversed, the
    words kept ("12 + 34 = 46" -> "21 + 43 = 64"; "The answer is 46." -> "The answer is 64.")."""
    return re.sub(r"\d+", lambda m: m.group()[::-1], text)


def format_pairs(problems: list[Problem], samples: list[list[str]]) -> list[dict]:
    """``policy_pairs`` rewritten in the reversed-digit format: the same preferences, in text the base
    finds unlikely (out of distribution) until an SFT on that format makes it likely (Table 5).

    A plain (tiny-base) pair is a bare answer, reversed whole; a chat reply keeps its words and has
    the digits of each of its numbers reversed, so chosen and rejected keep the policy's phrasing
    and only the notation is new. The report measures how unlikely that makes them (target NLL)."""
    def fmt(reply):
        if isinstance(reply, list):  # a chat reply: TRL's list of messages
            return [{**m, "content": reformat_reply(m["content"])} for m in reply]
        return reformat(reply)

    return [{"prompt": r["prompt"], "chosen": fmt(r["chosen"]), "rejected": fmt(r["rejected"])}
            for r in policy_pairs(problems, samples)]
