"""Full lab runs: opt in with ``pytest -m slow`` (minutes on a laptop CPU)."""

import json

import pytest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    from rlsparse.lab.demo import demo

    report = demo(out=tmp_path / "demo", cache_dir=str(tmp_path / "cache"), log=lambda m: None)
    assert report.is_file() and (report.parent / "report.md").is_file()
    results = json.loads((report.parent / "results.json").read_text())
    base = results["run"]["base_metadata"]
    assert 0.3 <= base["test_accuracy"]["add"] <= 0.8, "the base must be right only part of the time"
    for c in results["conjecture"].values():
        assert c["changed_outside_mask"] == 0
