"""`rlsparse train --output_dir` cannot write over its own inputs."""

from __future__ import annotations

import hashlib

import pytest

from test_cli import COMMON, _cli, base  # noqa: F401  (fixture)
from rlsparse.errors import UsageError


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("where", ["base", "."])
def test_output_dir_over_an_input_is_refused(base, where):  # noqa: F811
    out = base / where
    before = _digest(base / "base"), _digest(base)
    with pytest.raises(UsageError, match="--output_dir .* would write over the input"):
        _cli(["train", "sft", "--model", str(base / "base"), "--dataset", str(base / "data.jsonl"),
              "--mask", str(base / "sub.mask.safetensors"), "--output_dir", str(out), *COMMON])
    assert (_digest(base / "base"), _digest(base)) == before
