"""``rlsparse demo``: the miniature reproduction end to end, in minutes on a laptop CPU.

Base (cached or built); every built-in recipe with its quick settings (SFT in and out of
distribution, RFT, DPO on the policy's own and on constructed pairs, GRPO with/without KL and
clipping), each at three learning rates; then the diffs, the Conjecture 1 subnetwork reruns
(DPO, GRPO) and the report.

The cells and Conjecture 1's trainings run side by side on worker processes (``lab.parallel``,
``jobs="auto"``: one per core, at most 4), each with one torch thread: the same checkpoints and
numbers, bit for bit, as one process with one thread.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from rlsparse.lab.recipes import load_recipe
from rlsparse.lab.runner import DEMO_RECIPES, LabOptions, run_lab

# --smoke: every stage of the demo in seconds (the README test runs it); the numbers mean nothing.
SMOKE = {"steps": 6, "n_train": 48, "batch_size": 8, "samples_per_prompt": 4}
SMOKE_N_TEST = 40


def demo(out: str | Path | None = None, device: str = "cpu", cache_dir: str | None = None,
         model: str | None = None, log=print, resume: bool = False, progress: str = "auto",
         smoke: bool = False, jobs: int | str = "auto") -> Path:
    """Run the miniature lab (quick recipes) and return the report's path.

    Args:
        out: Run folder; default ``./runs/demo-<timestamp>``.
        device: "cpu" or "cuda".
        cache_dir: Where the tiny base is cached (default ``~/.cache/rlsparse/lab``).
        model: Start from this HF folder instead of the tiny base.
        log: Progress printer.
        progress: Progress within each training run (``--progress`` mode).
        resume: Continue the demo run already in ``out`` (otherwise an existing run is refused).
        smoke: Six steps per run and 40 held-out problems: checks that every stage runs, in
            seconds once the base is cached; its numbers mean nothing.
        jobs: Worker processes training cells side by side: a number, or "auto" (the cores, at most
            4, as many as the memory holds; 1 on CUDA). 1 runs everything in this process.

    Returns:
        Path of ``report.html``.

    Example:
        >>> print(demo())
    """
    out = Path(out) if out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    start = time.time()
    clock = (lambda m: log(f"[{time.time() - start:5.0f}s] {m}"))
    opts = LabOptions(out=out, quick=True, device=device, cache_dir=cache_dir, model=model, progress=progress,
                      jobs=jobs)
    with tempfile.TemporaryDirectory(prefix="rlsparse-smoke-") as tmp:
        recipes: list[str] = list(DEMO_RECIPES)
        if smoke:
            opts.n_test = SMOKE_N_TEST
            recipes = [_smoke_recipe(name, Path(tmp)) for name in DEMO_RECIPES]
        run_dir = run_lab(recipes, opts, log=clock, resume=resume)
    clock("done")
    return run_dir / "report.html"


def _smoke_recipe(name: str, folder: Path) -> str:
    recipe = load_recipe(name).quickened()
    data = {**recipe.to_dict(), **SMOKE, "quick": {}}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)
