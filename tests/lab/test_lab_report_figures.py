"""The report's figures are readable at the page's width: the data behind each panel, the layout
(legends outside the data, distinct colours, 8 pt or more), not the pixels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _synthetic import RECIPES, results  # noqa: E402

from rlsparse.lab.report import FIG_WIDTH_IN, _figure, findings  # noqa: E402


@pytest.fixture(scope="module")
def figures():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    res = results()
    out = {}
    for f in findings(res):
        fig = _figure(f, res)
        if fig is not None:
            FigureCanvasAgg(fig).draw()
            out[f.key] = fig
    return out


def test_every_section_has_a_figure(figures):
    assert set(figures) == {"sparsity_sft_vs_rl", "tolerance", "rank", "layers", "kl_clip", "conjecture", "dynamics",
                            "precision"}


def test_figures_are_drawn_at_the_page_width_with_text_of_8_points_or_more(figures):
    for key, fig in figures.items():
        assert fig.get_figwidth() == pytest.approx(FIG_WIDTH_IN), key
        texts = [t for leg in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
                 for t in leg.get_texts()]
        texts += [t for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
        small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 8]
        assert small == [], key


def test_legends_never_cover_data(figures):
    for key, fig in figures.items():
        assert all(ax.get_legend() is None for ax in fig.axes), f"{key}: a legend inside the axes"
        renderer = fig.canvas.get_renderer()
        for leg in fig.legends:
            box = leg.get_window_extent(renderer)
            for ax in fig.axes:
                if ax.get_visible() and ax.get_label() != "<colorbar>":
                    assert not box.overlaps(ax.get_window_extent(renderer)), key


def test_tolerance_sweep_is_one_panel_per_recipe_coloured_by_learning_rate(figures):
    fig = figures["tolerance"]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == list(sorted(RECIPES, key=list(RECIPES).index))
    for ax in panels:
        colours = [tuple(line.get_color()) for line in ax.lines]
        assert len(ax.lines) == 3 and len(set(colours)) == 3
    # the same learning rate has the same colour in every panel
    assert len({tuple(tuple(line.get_color()) for line in ax.lines) for ax in panels}) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["lr 1e-06", "lr 1e-05", "lr 0.0001"]


def test_lines_in_one_panel_never_share_a_colour(figures):
    for key in ("sparsity_sft_vs_rl", "dynamics", "precision", "kl_clip"):
        for ax in figures[key].axes:
            styles = [(tuple(matplotlib_rgba(line.get_color())), line.get_linestyle()) for line in ax.lines]
            assert len(styles) == len(set(styles)), key


def matplotlib_rgba(colour):
    from matplotlib.colors import to_rgba

    return to_rgba(colour)


def test_heatmap_types_in_model_order(figures):
    fig = figures["layers"]
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2
    for ax in panels:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["q", "k", "v", "o", "gate", "up", "down", "norm"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
