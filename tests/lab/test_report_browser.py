"""The lab report opened in a real browser (headless Chromium through Playwright): every image
loads, no console errors, every section shows its verdict and the paper's number. A screenshot
is kept as an artifact (its path is printed)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _synthetic import write_run  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def _chromium() -> str:
    path = os.environ.get("RLSPARSE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.skip("no chromium executable (install Debian's `chromium`, or set RLSPARSE_CHROMIUM); "
                    ".ci/run installs it")
    return path


def test_report_renders_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                                                 "'rlsparse[dev]')")
    executable = _chromium()
    from rlsparse.lab.report import render

    page_path, _ = render(write_run(tmp_path / "run"))
    shot = tmp_path / "report.png"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(page_path.resolve().as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.clientWidth])")
            sections = page.eval_on_selector_all(
                "div.f", "divs => divs.map(d => [d.querySelector('h2')?.innerText, d.querySelector('.v')?.innerText, "
                         "[...d.querySelectorAll('p')].map(p => p.innerText).find(t => t.startsWith('Paper:'))])")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"report screenshot: {shot}")
    source = page_path.read_text()
    assert errors == []
    # every image the page names is shown (the report has at least one figure per finding with a plot)
    assert len(images) == source.count("<img ") >= 8
    assert [src for src, complete, natural, shown in images if not (complete and natural > 0 and shown > 0)] == []
    assert len(sections) == source.count("<div class='f'>") >= 8
    for title, verdict, paper in sections:
        assert verdict and verdict.strip(), title
        assert paper and paper.removeprefix("Paper:").strip(), title
        # The paper states Figures 3 and 4 only in words ("similarly sparse", norms "little to no
        # update"; the subnetwork's loss is "consistently lower"); every other section quotes its number.
        if not title.startswith(("Figure 3", "Figure 4")):
            assert any(ch.isdigit() for ch in paper.removeprefix("Paper:")), (title, paper)
    assert shot.stat().st_size > 10_000
