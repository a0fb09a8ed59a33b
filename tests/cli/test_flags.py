"""Library errors name parameters; the CLI shows its flags instead."""

from __future__ import annotations

import pytest

from rlsparse.cli.flags import as_flags, flag


@pytest.mark.parametrize("message, shown", [
    ("tensor sets differ; pass allow_missing=True to compare the common ones",
     "tensor sets differ; pass --allow-missing to compare the common ones"),
    ("tolerances='x' is not a number; use e.g. 1e-5", "--tolerances 'x' is not a number; use e.g. 1e-5"),
    ("max_matrices=0: must be at least 1", "--max-matrices 0: must be at least 1"),
    ("checkpoints: got 3 paths", "--from-checkpoints: got 3 paths"),
    ("the tolerance that defines the mask", "the tolerance that defines the mask"),  # prose stays prose
])
def test_parameters_become_flags(message, shown):
    assert as_flags(message) == shown


def test_flag_names():
    assert flag("compare_dtype") == "--compare-dtype" and flag("mask_path") == "--save-mask"


def test_cli_error_names_the_flag(tmp_path, capsys):
    from tinymodels import save, tiny_llama
    from rlsparse.cli.main import main

    a = save(tiny_llama(), tmp_path / "a")
    code = main(["diff", str(a), str(a), "--tolerances", "abc", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--tolerances 'abc' is not a number" in err and "\n" == err[-1] and err.count("\n") == 1
