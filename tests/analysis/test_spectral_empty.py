"""spectral on a checkpoint holding an empty matrix: skipped with a note, not a traceback."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from rlsparse.cli.main import main


def test_empty_matrix_is_skipped(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    for side in ("a", "b"):
        save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(0, 32),
                   "model.layers.0.mlp.down_proj.weight": torch.randn(32, 32, generator=g)},
                  str(tmp_path / f"{side}.safetensors"))
    code = main(["spectral", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--quiet",
                 "--json", str(tmp_path / "s.json")])
    assert code == 0, capsys.readouterr().err
    import json

    doc = json.loads((tmp_path / "s.json").read_text())
    assert list(doc["matrices"]) == ["model.layers.0.mlp.down_proj.weight"]
    assert any("up_proj" in n and "empty" in n for n in doc["notes"])
