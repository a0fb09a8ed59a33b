"""Datasets given as a folder: save_to_disk Dataset, DatasetDict (split chosen), a folder of JSONL."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from rlsparse.errors import UsageError
from rlsparse.train.trainers import load_dataset_from

ROWS = {"prompt": ["w1 w2", "w3", "w4 w5 w6"], "answer": ["1", "2", "3"]}


def test_saved_dataset_folder(tmp_path):
    Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_dataset_from(str(tmp_path / "ds")).to_dict() == ROWS


def test_saved_dataset_dict_folder_takes_the_split(tmp_path):
    other = {"prompt": ["x"], "answer": ["9"]}
    DatasetDict({"train": Dataset.from_dict(ROWS), "test": Dataset.from_dict(other)}).save_to_disk(str(tmp_path / "dd"))
    assert load_dataset_from(str(tmp_path / "dd")).to_dict() == ROWS
    assert load_dataset_from(str(tmp_path / "dd"), split="test").to_dict() == other


def test_folder_of_jsonl_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for p, a in zip(ROWS["prompt"], ROWS["answer"]):
            f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    assert load_dataset_from(str(folder)).to_dict() == ROWS


def test_missing_local_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file or folder"):
        load_dataset_from(str(tmp_path / "nope.jsonl"))
