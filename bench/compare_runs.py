"""Are two lab run folders the same science? Compare every measured number and every saved weight.

Used to check that a speed change to ``rlsparse demo`` / ``rlsparse lab run`` changed only the cost
of computing the results: ``results.json``, ``report.json`` and ``table4.json`` must be equal once
wall-clock fields (seconds, step costs, creation dates) and execution settings that do not enter
any computation (worker processes, the absolute paths of the base and the pre-registration file)
are left out. Every figure must be byte-identical, and every ``*.safetensors`` file (checkpoints,
masks) must hold bit-identical tensors and the same metadata except the paths a mask records of
the checkpoints it was made from (``base``, ``finetuned``: the run folders differ).

Usage:
    python bench/compare_runs.py RUN_A RUN_B

Prints one line per difference and a summary; exits 0 when the runs agree, 1 otherwise.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

# Wall-clock measurements: they differ between any two runs of the same work.
TIMING_KEYS = frozenset({"seconds", "eval_seconds", "eval_load_seconds", "cell_seconds", "step_cost",
                         "phase_seconds", "created", "sessions", "train_seconds"})
# How the work was scheduled or where it lives, not what it computed (run.json's record of the run).
EXECUTION_KEYS = frozenset({"jobs", "worker_threads", "base"})
# Paths that name where a file was read from, not what it held.
PATH_KEYS = {"/run/preregistration": "source", "/preregistration": "source"}
MASK_PATH_KEYS = ("base", "finetuned")
JSON_FILES = ("results.json", "report.json", "table4.json", "run.json")


def _strip(obj, path: str = ""):
    if isinstance(obj, dict):
        return {k: _strip(v, f"{path}/{k}") for k, v in obj.items()
                if k not in TIMING_KEYS and not (k in EXECUTION_KEYS and _is_run_record(path))
                and PATH_KEYS.get(path) != k}
    if isinstance(obj, list):
        return [_strip(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    return obj


def _is_run_record(path: str) -> bool:
    """The run's own record: run.json at the top, or results.json's copy of it under "run"."""
    return path in ("", "/run")


def _differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'B' if k not in a else 'A'}")
            else:
                out += _differences(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # NaN == NaN here
    return [] if same else [f"{path}: {str(a)[:120]!r} vs {str(b)[:120]!r}"]


def _sha(path: Path) -> str:
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    meta = header.pop("__metadata__", {}) or {}
    if "rlsparse" in meta:  # a mask: its record of where its inputs were is a path
        record = json.loads(meta["rlsparse"])
        meta = {**meta, "rlsparse": {k: v for k, v in record.items() if k not in MASK_PATH_KEYS}}
    digest = hashlib.sha256(json.dumps([header, meta], sort_keys=True).encode())
    digest.update(raw[8 + size:])  # every tensor's bytes, as stored
    return digest.hexdigest()


def _files(root: Path, patterns: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for pattern in patterns:
        for f in root.rglob(pattern):
            rel = f.relative_to(root)
            if rel.parts[0] != "base":  # the link to the shared cached base
                found[str(rel)] = _sha(f)
    return found


def compare(run_a: Path, run_b: Path) -> list[str]:
    """Every difference between two run folders beyond timing and execution fields (empty: the same)."""
    problems = []
    for name in JSON_FILES:
        fa, fb = run_a / name, run_b / name
        if not fa.is_file() and not fb.is_file():
            continue
        if not (fa.is_file() and fb.is_file()):
            problems.append(f"{name}: only in {'A' if fa.is_file() else 'B'}")
            continue
        da, db = (_strip(json.loads(f.read_text())) for f in (fa, fb))
        problems += [f"{name}{d}" for d in _differences(da, db)]
    wa, wb = (_files(r, ("*.safetensors", "*.png")) for r in (run_a, run_b))
    for rel in sorted(set(wa) | set(wb)):
        if wa.get(rel) != wb.get(rel):
            problems.append(f"{rel}: " + ("only in " + ("A" if rel in wa else "B") if rel not in wa or rel not in wb
                                          else "content differs"))
    print(f"compared {len(JSON_FILES)} JSON documents and {len(wa)} weight/mask/figure files")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python bench/compare_runs.py RUN_A RUN_B", file=sys.stderr)
        return 2
    problems = compare(Path(argv[0]), Path(argv[1]))
    for p in problems:
        print(p)
    print("identical (except timing and execution fields)" if not problems else f"{len(problems)} differences")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
