"""`demo` and `lab run` refuse before any work: a missing extra (nothing left behind) and a run
folder that already holds a run (unless --resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlsparse.cli.main import main

# Hides the train/lab extras from the interpreter, as if only the core were installed.
_HIDE = textwrap.dedent("""
    import sys
    HIDDEN = {"trl", "transformers", "datasets", "accelerate"}

    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    from rlsparse.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("argv", [["demo", "--out", "{out}"], ["lab", "run", "grpo", "--quick", "--out", "{out}"]])
def test_core_only_names_the_extra_and_leaves_nothing(tmp_path, argv):
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    env = {**os.environ, "RLSPARSE_LAB_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _HIDE, *[a.format(out=out) for a in argv]], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "is not installed" in proc.stderr and "pip install 'rlsparse[lab]'" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == []  # no run folder, no cache, no runs/


def _hold_a_run(folder: Path) -> None:
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"schema_version": 1, "kind": "rlsparse-lab-run"}))


@pytest.mark.parametrize("command", [["demo"], ["lab", "run", "grpo", "--quick"]])
def test_reusing_a_run_folder_is_refused_without_resume(tmp_path, capsys, command):
    out = tmp_path / "run"
    _hold_a_run(out)
    assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a lab run; pass --resume" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_resume_needs_a_run_to_continue(tmp_path, capsys):
    assert main(["lab", "run", "grpo", "--resume", "--out", str(tmp_path / "new")]) == 2
    assert "holds no lab run" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_library_refuses_an_existing_run_without_resume(tmp_path):
    from rlsparse.errors import OutputError
    from rlsparse.lab.runner import LabOptions, run_lab

    out = tmp_path / "run"
    _hold_a_run(out)
    with pytest.raises(OutputError, match="already holds a lab run"):
        run_lab(["grpo"], LabOptions(out=out, quick=True))


@pytest.mark.parametrize("extra, says", [
    (["--grid-lrs", "1e-6"], "--grid-lrs chooses learning rates of a --grid run; add --grid"),
    (["--grid", "--grid-lrs", "1e-6,x"], "--grid-lrs '1e-6,x': expected comma-separated positive learning rates"),
    (["--grid", "--grid-lrs", "0"], "--grid-lrs '0': expected comma-separated positive learning rates"),
])
def test_grid_lrs_is_checked_before_any_work(tmp_path, capsys, extra, says):
    assert main(["lab", "run", "grpo", "--quick", "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flags", "jobs"), [([], "auto"), (["--jobs", "1"], 1), (["--jobs", "3"], 3)])
def test_demo_passes_its_worker_processes_to_the_lab(tmp_path, monkeypatch, flags, jobs):
    from rlsparse.lab import demo as demo_module

    seen = {}

    def fake_run_lab(recipes, opts, log=print, resume=False):
        seen.update(recipes=list(recipes), jobs=opts.jobs, threads=opts.threads, quick=opts.quick)
        return Path(opts.out)

    monkeypatch.setattr(demo_module, "run_lab", fake_run_lab)
    assert main(["demo", "--out", str(tmp_path / "run"), "--progress", "none", *flags]) == 0
    # one torch thread per worker (threads None: 1), every demo recipe, quick settings
    assert seen == {"recipes": list(demo_module.DEMO_RECIPES), "jobs": jobs, "threads": None, "quick": True}


def test_demo_refuses_a_worker_count_that_is_not_positive(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--jobs", "0"])
    assert stop.value.code == 2
    assert "--jobs" in capsys.readouterr().err
