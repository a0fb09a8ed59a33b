"""A small recipe file for runner tests on the tiny base: two learning rates, two steps, 32 rows."""

from __future__ import annotations

import json


def write_recipe(tmp_path, name, **fields) -> str:
    """Write ``tmp_path/NAME.json`` (the tiny defaults below, overridden by ``fields``); return its path."""
    data = {"name": name, "learning_rates": [1e-3, 1e-2], "steps": 2, "batch_size": 8, "n_train": 32,
            "samples_per_prompt": 4, "seed": 1, **fields}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)
