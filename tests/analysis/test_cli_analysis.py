"""The analysis commands end to end: JSON, PNG, tables, and one-line errors with no partial output."""

from __future__ import annotations

import json

import pytest
import torch

from _build import base_model, bump, random_choice, write
from rlsparse.cli import main as cli_main
from rlsparse.masks import Mask

PNG = b"\x89PNG\r\n\x1a\n"


def main(argv):
    return cli_main.main(argv)


@pytest.fixture
def runs(tmp_path):
    base, sd = base_model(tmp_path)
    a = write(bump(sd, random_choice(sd, 0.3, seed=1)), base, tmp_path / "a")
    b = write(bump(sd, random_choice(sd, 0.2, seed=2)), base, tmp_path / "b")
    run = tmp_path / "run"
    run.mkdir()
    write(bump(sd, random_choice(sd, 0.1, seed=3)), base, run / "checkpoint-5")
    write(bump(sd, random_choice(sd, 0.2, seed=4)), base, run / "checkpoint-10")
    return tmp_path, base, a, b, run


def _masks(tmp_path, k=3):
    shapes = {"model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.1.mlp.up_proj.weight": (16, 8)}
    paths = []
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        Mask.from_tensors({n: torch.rand(s, generator=g) < 0.4 for n, s in shapes.items()}).save(tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}"))
    return paths


def test_overlap_masks_three_way(tmp_path, capsys):
    paths = _masks(tmp_path)
    rc = main(["overlap", *paths, "--json", str(tmp_path / "o.json"), "--plot", str(tmp_path / "o.png")])
    assert rc == 0
    doc = json.loads((tmp_path / "o.json").read_text())
    assert doc["schema_version"] == 1 and len(doc["pairs"]) == 3
    assert [(p["a"], p["b"]) for p in doc["pairs"]] == [(paths[0], paths[1]), (paths[0], paths[2]),
                                                        (paths[1], paths[2])]
    assert len(doc["matrix"]["overlap"]) == 3
    assert (tmp_path / "o.png").read_bytes()[:8] == PNG
    assert "% of row's subnetwork covered" in capsys.readouterr().out


def test_overlap_from_checkpoints_and_two_mask_plot(runs, capsys):
    tmp_path, base, a, b, _ = runs
    rc = main(["overlap", "--from-checkpoints", str(base), str(a), str(base), str(b), "--labels", "A,B",
               "--json", str(tmp_path / "o.json"), "--plot", str(tmp_path / "o.png"), "--no-layers"])
    assert rc == 0
    doc = json.loads((tmp_path / "o.json").read_text())
    assert doc["pairs"][0]["a"] == "A" and doc["source"] == "checkpoints" and doc["tolerance"] == 1e-5
    assert (tmp_path / "o.png").read_bytes()[:8] == PNG


def test_series_rank_precision_spectral(runs, capsys):
    tmp_path, base, a, b, run = runs
    assert main(["series", str(base), str(run), "--json", str(tmp_path / "s.json"),
                 "--plot", str(tmp_path / "s.png")]) == 0
    doc = json.loads((tmp_path / "s.json").read_text())
    assert [c["step"] for c in doc["checkpoints"]] == [5, 10]
    assert doc["never_updated"] + doc["cancelled"] + doc["final_subnetwork"] == pytest.approx(1)
    for cmd, extra in (("rank", ["--device", "cpu", "--layers", "0"]), ("precision", ["--per-tensor"]),
                       ("spectral", ["--device", "cpu", "--top-k", "4", "--max-matrices", "3"])):
        out_json, out_png = tmp_path / f"{cmd}.json", tmp_path / f"{cmd}.png"
        assert main([cmd, str(base), str(a), *extra, "--json", str(out_json), "--plot", str(out_png)]) == 0, cmd
        assert json.loads(out_json.read_text())["kind"] == cmd
        assert out_png.read_bytes()[:8] == PNG
    out = capsys.readouterr().out
    assert "Table 2" in out and "ULP" in out and "top 4" in out


@pytest.mark.parametrize("argv, message", [
    (["series", "{base}", "{run}/checkpoint-5"], "at least two checkpoints"),
    (["series", "{base}", "{run}/checkpoint-5", "{tmp}/nothing"], "no such file"),
    (["overlap", "{m0}"], "at least two mask files"),
    (["overlap", "{m0}", "{m0}", "--tolerance", "0"], "applies to --from-checkpoints"),
    (["overlap", "{m0}", "{other}"], "do not describe the same model"),
    (["overlap", "{m0}", "{base}/config.json"], "mask"),
    (["rank", "{base}", "{a}", "--layers", "x"], "--layers"),
    (["rank", "{base}", "{a}", "--device", "cuda:7"], "--device"),
    (["spectral", "{base}", "{a}", "--top-k", "0"], "--top-k"),
    (["series", "{base}", "{run}", "--tolerance", "-1"], ">= 0"),
])
def test_errors_are_one_line_and_leave_no_output(runs, capsys, argv, message):
    tmp_path, base, a, b, run = runs
    m0 = _masks(tmp_path, 1)[0]
    Mask.from_tensors({"w": torch.ones(3, 3, dtype=torch.bool)}).save(tmp_path / "other")
    fill = {"base": base, "a": a, "run": run, "tmp": tmp_path, "m0": m0, "other": tmp_path / "other"}
    out = tmp_path / "out.json"
    rc = main([x.format(**fill) for x in argv] + ["--json", str(out), "--plot", str(tmp_path / "out.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and not (tmp_path / "out.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
