"""The README runs as written: every marked command block, in order, in a fresh folder.

A block is run when the line before its opening fence is ``<!-- readme-test -->``; in it, every
line starting with ``$ `` is a command (a trailing backslash continues it on the next line) and
the other lines are the output shown. The commands run in one temporary folder with a private
lab cache and home, with tiny settings: ``rlsparse demo`` gets ``--smoke`` (six steps per run).
Each must exit 0, and the ``wrote ...`` / ``report: ...`` lines the README shows must be printed.
To check a new README section, put the marker above its block.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- readme-test -->"
# What the README shows is the full run; the test runs the same commands with tiny settings.
TINY = {"rlsparse demo": "--smoke"}


def readme_blocks(text: str) -> list[list[tuple[str, list[str]]]]:
    """The marked blocks: each a list of (command, output lines shown under it)."""
    blocks = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = i + 1
        if fence >= len(lines) or not lines[fence].startswith("```"):
            raise AssertionError(f"README line {i + 1}: {MARKER} must be followed by a ``` block")
        commands: list[tuple[str, list[str]]] = []
        j = fence + 1
        while j < len(lines) and not lines[j].startswith("```"):
            if lines[j].startswith("$ "):
                command = lines[j][2:]
                while command.endswith("\\"):
                    j += 1
                    command = command[:-1].rstrip() + " " + lines[j].strip()
                commands.append((command, []))
            elif commands:
                commands[-1][1].append(lines[j])
            j += 1
        blocks.append(commands)
    return blocks


def tiny(command: str) -> str:
    for prefix, extra in TINY.items():
        if command.startswith(prefix + " ") or command == prefix:
            return f"{command} {extra}"
    return command


def test_marked_blocks_are_found():
    blocks = readme_blocks((ROOT / "README.md").read_text())
    commands = [c for block in blocks for c, _ in block]
    assert commands[0].startswith("rlsparse demo --out runs/demo")
    for name in ("diff", "overlap", "series", "rank", "precision", "train", "lab report"):
        assert any(c.startswith(f"rlsparse {name} ") for c in commands), name


def test_parser_reads_prompts_continuations_and_outputs():
    text = "x\n<!-- readme-test -->\n```console\n$ a b \\\n    c\nout 1\n$ d\n```\n```\n$ not run\n```\n"
    assert readme_blocks(text) == [[("a b c", ["out 1"]), ("d", [])]]


def test_readme_commands_run_in_order(tmp_path):
    pytest.importorskip("trl")
    blocks = readme_blocks((ROOT / "README.md").read_text())
    work, home, bindir = tmp_path / "work", tmp_path / "home", tmp_path / "bin"
    for d in (work, home, bindir):
        d.mkdir()
    # `rlsparse` runs this checkout with this interpreter, whatever is installed on the PATH.
    shim = bindir / "rlsparse"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m rlsparse \"$@\"\n")
    shim.chmod(0o755)
    env = {**os.environ, "HOME": str(home), "RLSPARSE_LAB_CACHE": str(tmp_path / "lab-cache"),
           "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "100",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for block in blocks:
        for command, shown in block:
            run = tiny(command)
            proc = subprocess.run(["bash", "-c", run], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=1800)
            assert proc.returncode == 0, f"README command failed: {run}\n{proc.stderr[-3000:]}"
            printed = proc.stdout.splitlines()
            for line in shown:
                if re.match(r"(wrote \w+|report|markdown): ", line):
                    assert line.strip() in [p.strip() for p in printed], f"{run}: expected {line!r} in its output"


def test_setup_is_two_commands_and_ci_runs_the_test_one():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert commands[0].endswith("pip install torch==2.13.0 && pip install -e '.[dev]' && rlsparse demo")
    assert commands[1].endswith("pip install torch==2.13.0 && pip install -e '.[dev]' && python -m pytest -q")
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    test_command = commands[1].rsplit("&& ", 1)[1]
    assert test_command in ci
