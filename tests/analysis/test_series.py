"""Training-run series (Figures 2, 5, 6, 7; Appendix D) against brute force on hand-made runs."""

from __future__ import annotations

import json

import pytest
import torch

from _build import base_model, brute_changed, bump, random_choice, state, write
from rlsparse.analysis.series import find_checkpoints, series
from rlsparse.errors import CheckpointError, MismatchError, UsageError


@pytest.fixture
def run(tmp_path):
    """base -> checkpoint-10 (A) -> checkpoint-20 (A + B) -> checkpoint-100 (B + C, A reverted)."""
    base, sd = base_model(tmp_path)
    a = random_choice(sd, 0.2, seed=1)
    b = random_choice(sd, 0.1, seed=2)
    c = random_choice(sd, 0.05, seed=3)
    out = tmp_path / "run"
    out.mkdir()
    s1 = bump(sd, a)
    s2 = bump(s1, b, amount=0.5)
    s3 = {k: torch.where(a[k], sd[k], s2[k]) for k in sd}  # A cancelled out exactly
    s3 = bump(s3, c, amount=-0.5)
    # written out of order, so ordering must come from the step number
    write(s3, base, out / "checkpoint-100")
    write(s1, base, out / "checkpoint-10", shard=None)  # one model.safetensors
    write(s2, base, out / "checkpoint-20")
    return base, out, sd


def test_series_equals_brute_force(run):
    base, out, sd = run
    paths = find_checkpoints(out)
    assert [p.name for p in paths] == ["checkpoint-10", "checkpoint-20", "checkpoint-100"]
    r = series(base, [out], chunk_elements=128)
    sds = [state(p) for p in paths]
    chg = [{k: brute_changed(sd[k], s[k], 1e-5) for k in sd} for s in sds]
    n = sum(v.numel() for v in sd.values())
    total = lambda m: sum(int(v.sum()) for v in m.values())  # noqa: E731
    assert r.numel == n
    assert r.changed == [total(c) for c in chg]
    assert r.consecutive_changed == [
        total({k: brute_changed(sds[i][k], sds[i + 1][k], 1e-5) for k in sd}) for i in range(2)]
    final = chg[-1]
    assert r.outside_final == [total({k: c[k] & ~final[k] for k in sd}) for c in chg]
    ever = {k: chg[0][k] | chg[1][k] | chg[2][k] for k in sd}
    assert r.never == n - total(ever)
    assert r.cancelled_count == total({k: ever[k] & ~final[k] for k in sd}) > 0
    assert r.never_updated + r.cancelled + r.final_subnetwork == pytest.approx(1.0)
    assert r.steps == [10, 20, 100]
    doc = r.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["schema_version"] == 1
    assert [c["path"] for c in doc["checkpoints"]] == [str(p) for p in paths]
    assert doc["checkpoints"][0]["sparsity"] == 1 - r.changed[0] / n
    assert len(doc["consecutive"]) == 2
    for key in ("never_updated", "cancelled", "final_subnetwork"):
        assert 0 <= doc[key] <= 1


def test_tolerance_zero_sees_sub_tolerance_moves(tmp_path):
    base, sd = base_model(tmp_path, dtype=torch.float32)
    name = "model.layers.0.mlp.up_proj.weight"
    tiny = {k: v.clone() for k, v in sd.items()}
    tiny[name].view(-1)[:5] += 1e-7  # below the paper's tolerance
    ck1 = write(tiny, base, tmp_path / "c1", dtype=torch.float32)
    ck2 = write(sd, base, tmp_path / "c2", dtype=torch.float32)
    assert series(base, [ck1, ck2]).cancelled_count == 0
    r0 = series(base, [ck1, ck2], tolerance=0)
    assert r0.changed == [5, 0] and r0.cancelled_count == 5 and r0.consecutive_changed == [5]


def test_bad_inputs(run, tmp_path):
    base, out, sd = run
    with pytest.raises(UsageError, match="at least two"):
        series(base, [out / "checkpoint-10"])
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_checkpoints(tmp_path / "run" / "checkpoint-10")
    with pytest.raises(CheckpointError):
        series(base, [out / "checkpoint-10", tmp_path / "missing"])
    from _build import save, tiny_llama

    other = save(tiny_llama(vocab=128), tmp_path / "other")
    with pytest.raises(MismatchError, match="do not match the base"):
        series(base, [out / "checkpoint-10", other])


def test_training_output_folder_with_final_weights_ends_with_them(run):
    from rlsparse.analysis.series import expand_checkpoints

    base, out, sd = run
    s_final = bump(sd, random_choice(sd, 0.3, seed=9))
    write(s_final, base, out)  # the trainer's final save, next to its checkpoint-* folders
    paths = expand_checkpoints([out])
    assert [p.split("/")[-1] for p in paths] == ["checkpoint-10", "checkpoint-20", "checkpoint-100", "run"]
    r = series(base, [out])
    assert len(r.changed) == 4
    assert r.changed[-1] == sum(int(brute_changed(sd[k], s_final[k], 1e-5).sum()) for k in sd)
