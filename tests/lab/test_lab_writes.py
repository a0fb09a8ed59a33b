"""The lab writes through io/atomic: an interrupted write leaves neither output nor temporary."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlsparse.lab import report, runner


@pytest.mark.parametrize("write", [lambda p: runner._write_json(p, {"a": 1}), lambda p: report._write(p, "x")])
def test_interrupted_lab_write_leaves_nothing(tmp_path, monkeypatch, write):
    real = Path.write_text

    def half_then_interrupt(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []
