"""The dataset formats ``rlsparse train`` accepts per algorithm, and the one-line error for any other.

TRL reads a few fixed column layouts (its "dataset formats"). The lab's ``{"prompt", "answer"}``
rows are accepted where they mean something: SFT trains on the answer as the completion, and
GRPO / RLOO / OnlineDPO generate from the prompt and hand ``answer`` to the reward. Everything
else is checked here, before the model trains, so TRL never sees a dataset it would fail on
deep inside its preprocessing.
"""

from __future__ import annotations

from rlsparse.errors import UsageError

# Accepted column sets per algorithm, the canonical one first. An algorithm missing here
# (a newer one) is checked against its ``Algorithm.columns``.
_PAIRS = (("prompt", "chosen", "rejected"),)
FORMATS: dict[str, tuple[tuple[str, ...], ...]] = {
    "sft": (("prompt", "completion"), ("text",), ("messages",), ("prompt", "answer")),
    "dpo": _PAIRS,
    "orpo": _PAIRS,
    "cpo": _PAIRS,
    "simpo": _PAIRS,
    "kto": (("prompt", "completion", "label"),),
    "grpo": (("prompt",),),
    "rloo": (("prompt",),),
    "online-dpo": (("prompt",),),
}


def accepted_formats(algo_name: str, default: tuple[str, ...] = ()) -> tuple[tuple[str, ...], ...]:
    """The column sets ``algo_name`` accepts (``default`` for an algorithm without an entry)."""
    return FORMATS.get(algo_name, (default,))


def load(spec: str, split: str = "train", name: str | None = None):
    """``trainers.load_dataset_from``, with any reading failure of the datasets library as UsageError.

    Example:
        >>> ds = load("data/add.jsonl")
    """
    import datasets

    from rlsparse.train.trainers import load_dataset_from

    # The "Generating train split" bars and the library's own error log (with a traceback) would
    # stand between the user and the one-line error below.
    shown = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return load_dataset_from(spec, split=split, name=name)
    except UsageError:
        raise
    except Exception as exc:  # datasets / pyarrow errors: malformed JSON, mixed types, missing split, offline hub
        text = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise UsageError(f"--dataset {spec}: cannot be read as a dataset ({text}); see docs/train.md for the "
                         "accepted formats") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if shown:
            datasets.enable_progress_bars()


def prepare(algo_name: str, dataset, *, rewards: list[str] | None = None, default: tuple[str, ...] = ()):
    """Check ``dataset`` against the formats ``algo_name`` accepts and convert the lab's rows.

    Args:
        algo_name: The command-line algorithm name (``sft``, ``grpo``, ...).
        dataset: A ``datasets.Dataset``.
        rewards: The ``--reward`` specs; the built-in ``exact_answer`` needs an ``answer`` column.
        default: Columns of an algorithm without a ``FORMATS`` entry.

    Returns:
        The dataset TRL should see (SFT's prompt/answer rows become prompt/completion).

    Raises:
        UsageError: One line naming the columns found and the column sets expected.

    Example:
        >>> prepare("sft", Dataset.from_list([{"prompt": "2+3=", "answer": "5"}])).column_names
        ['prompt', 'completion']
    """
    found = list(dataset.column_names)
    formats = accepted_formats(algo_name, default)
    match = next((cols for cols in formats if set(cols) <= set(found)), None)
    if match is None:
        expected = " | ".join("+".join(cols) for cols in formats)
        raise UsageError(f"{algo_name}: the dataset has columns {found}, expected {expected}; "
                         "see docs/train.md (dataset formats)")
    if len(dataset) == 0:
        raise UsageError(f"{algo_name}: the dataset has no rows")
    if "exact_answer" in (rewards or []) and "answer" not in found:
        raise UsageError(f"{algo_name}: --reward exact_answer compares with an 'answer' column, and the dataset has "
                         f"columns {found}; add 'answer' or pass another --reward")
    _check_text(algo_name, dataset, match)
    if algo_name == "sft" and match == ("prompt", "answer"):
        completions = [str(a) for a in dataset["answer"]]
        dataset = dataset.remove_columns("answer").add_column("completion", completions)
    return dataset


def _check_text(algo_name: str, dataset, columns: tuple[str, ...]) -> None:
    """Text columns hold strings, or lists of chat messages (TRL's conversational format)."""
    first = dataset[0]
    for col in columns:
        if col in ("label", "answer"):
            continue
        value = first[col]
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, dict) for m in value)):
            continue
        raise UsageError(f"{algo_name}: column {col!r} holds {type(value).__name__} values (first row: "
                         f"{str(value)[:40]!r}), expected text or a list of chat messages")
