"""`rlsparse train` dataset formats: the lab's prompt/answer rows where they mean something, and
one line naming the columns found and expected for anything else."""

from __future__ import annotations

import json

import pytest

from trainhelpers import make_model, make_tokenizer
from rlsparse.cli.main import main
from rlsparse.errors import UsageError
from rlsparse.train import datasets as train_datasets

COMMON = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
          "--use_cpu", "--disable_tqdm", "true"]


@pytest.fixture
def base(tmp_path):
    model, tok = make_model(), make_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


LAB_ROWS = [{"prompt": "w1 w2", "answer": "w3"}, {"prompt": "w5", "answer": 6}] * 2


def test_sft_accepts_the_labs_prompt_answer_rows():
    from datasets import Dataset

    ds = train_datasets.prepare("sft", Dataset.from_list([{"prompt": "w1", "answer": "w3"}, {"prompt": "w2", "answer": "4"}]))
    assert ds.to_list() == [{"prompt": "w1", "completion": "w3"}, {"prompt": "w2", "completion": "4"}]


def test_sft_trains_on_prompt_answer_rows(base, tmp_path, capsys):
    data = _jsonl(tmp_path / "add.jsonl", [{"prompt": "w1 w2", "answer": "w3"}, {"prompt": "w5", "answer": "w6"}] * 2)
    code = main(["train", "sft", "--model", str(base), "--dataset", data, "--output_dir", str(tmp_path / "out"),
                 *COMMON])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("algo,rows,expected", [
    ("dpo", LAB_ROWS, "expected prompt+chosen+rejected"),
    ("kto", LAB_ROWS, "expected prompt+completion+label"),
    ("sft", [{"question": "w1", "reply": "w2"}], "expected prompt+completion | text | messages | prompt+answer"),
    ("grpo", [{"question": "w1", "answer": "w2"}], "expected prompt;"),
])
def test_wrong_columns_are_one_line_naming_found_and_expected(base, tmp_path, capsys, algo, rows, expected):
    data = _jsonl(tmp_path / "d.jsonl", rows)
    extra = ["--reward", "exact_answer", "--num_generations", "2"] if algo == "grpo" else []
    code = main(["train", algo, "--model", str(base), "--dataset", data, "--output_dir", str(tmp_path / "out"),
                 *extra, *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"the dataset has columns {list(rows[0])}" in err and expected in err
    assert not (tmp_path / "out").exists()


def test_exact_answer_needs_an_answer_column(base, tmp_path, capsys):
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": "w1"}, {"prompt": "w2"}])
    code = main(["train", "grpo", "--model", str(base), "--dataset", data, "--reward", "exact_answer",
                 "--num_generations", "2", "--output_dir", str(tmp_path / "out"), *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and "exact_answer compares with an 'answer' column" in err and "['prompt']" in err


def test_non_text_prompt_is_named():
    from datasets import Dataset

    with pytest.raises(UsageError, match=r"column 'prompt' holds int values .* expected text"):
        train_datasets.prepare("grpo", Dataset.from_list([{"prompt": 7, "answer": "7"}]))


def test_malformed_jsonl_is_one_line(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1", "completion": "w2"}\n{"prompt": \n')
    code = main(["train", "sft", "--model", str(base), "--dataset", str(bad), "--output_dir", str(tmp_path / "o"),
                 *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot be read as a dataset" in err, err


def test_every_algorithm_has_documented_formats():
    from rlsparse.train.trainers import ALGORITHMS

    doc = (__import__("pathlib").Path(__file__).parents[2] / "docs" / "train.md").read_text()
    for name in ALGORITHMS:
        formats = train_datasets.accepted_formats(name, ALGORITHMS[name].columns)
        row = next((line for line in doc.splitlines() if line.startswith("| ") and f"`{name}`" in line.split("|")[1]),
                   None)
        assert row is not None, f"docs/train.md has no dataset-format row for {name}"
        for cols in formats:
            assert ", ".join(f"`{c}`" for c in cols) in row.split("|")[2], (name, cols)
