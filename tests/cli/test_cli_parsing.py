"""Command-line parsing: no abbreviations anywhere, unknown options reported with the subcommand's
usage, and --plot written in the format its suffix names."""

from __future__ import annotations

import argparse

import pytest

from rlsparse.cli.main import main, make_parser


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_parser_refuses_abbreviations():
    parsers = list(_all_parsers(make_parser()))
    names = {p.prog for p in parsers}
    assert {"rlsparse", "rlsparse diff", "rlsparse lab run", "rlsparse series", "rlsparse demo"} <= names
    assert [p.prog for p in parsers if p.allow_abbrev] == []


def test_tolerance_is_not_taken_for_tolerances(tiny_pair, capsys):
    base, ft = tiny_pair
    with pytest.raises(SystemExit) as exc:
        main(["diff", str(base), str(ft), "--tolerance", "1e-5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --tolerance 1e-5" in err


def test_train_options_are_not_abbreviated(capsys):
    pytest.importorskip("trl")
    from rlsparse.cli.train_cmd import make_parser as train_parser

    assert train_parser("sft").allow_abbrev is False


def test_unknown_option_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["diff", "a", "b", "--save_mask", "m.safetensors"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: rlsparse diff ")
    assert "rlsparse diff: error: unrecognized arguments: --save_mask m.safetensors" in err


def test_nested_subcommand_usage(capsys):
    with pytest.raises(SystemExit):
        main(["lab", "run", "grpo", "--quik"])
    err = capsys.readouterr().err
    assert err.startswith("usage: rlsparse lab run ")
    assert "unrecognized arguments: --quik" in err


@pytest.mark.parametrize("suffix,magic", [(".pdf", b"%PDF"), (".svg", b"<?xml"), (".png", b"\x89PNG")])
def test_plot_is_written_in_the_format_of_its_suffix(tiny_pair, tmp_path, capsys, suffix, magic):
    base, ft = tiny_pair
    out = tmp_path / f"heat{suffix}"
    assert main(["diff", str(base), str(ft), "--plot", str(out), "--quiet"]) == 0
    assert out.read_bytes()[:len(magic)] == magic


def test_series_plot_as_pdf(tiny_pair, tmp_path, capsys):
    base, ft = tiny_pair
    out = tmp_path / "s.pdf"
    assert main(["series", str(base), str(ft), str(ft), "--plot", str(out), "--quiet"]) == 0
    assert out.read_bytes()[:4] == b"%PDF"


@pytest.mark.parametrize("name", ["heat.xyz", "heat"])
def test_unknown_plot_suffix_is_refused_before_any_work(tiny_pair, tmp_path, capsys, name):
    base, ft = tiny_pair
    code = main(["diff", str(base), str(ft), "--plot", str(tmp_path / name), "--json", str(tmp_path / "r.json"),
                 "--save-mask", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "expected a file name ending in one of" in err and ".pdf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]
