"""PNG plots of a built dataset (matplotlib, headless): written next to the card, embedded by it.

A figure is a ``*_figure`` builder (``builder(plt, *data)`` -> (figure, dpi)) and its data; ``draw``
writes one as a PNG whose bytes depend on the data only (fixed margins, no software tag).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: a figure builder: ``builder(plt, *data)`` -> (figure, dpi)
FigureBuilder = Callable[..., tuple[Any, int]]


def draw(path: Path, figure: FigureBuilder, *args: Any) -> None:
    """Write ``figure(plt, *args)`` as a PNG at ``path``."""
    plt = pyplot()
    save(plt, figure(plt, *args), path)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fixed_margins(fig: Any, left: float, right: float, bottom: float, top: float, **space: float) -> None:
    """Margins in inches (converted to the figure's fractions): what ``tight_layout`` would find
    for these labels, without its second layout pass (a third of a plot's time)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height, **space
    )


def positions_figure(plt: Any, positions: np.ndarray) -> tuple[Any, int]:
    """The histogram of relative injection positions, and its dpi."""
    fig, ax = plt.subplots(figsize=(6, 3))
    # an array: matplotlib walks a list value by value (seconds at a million rows)
    ax.hist(positions, bins=20, range=(0, 1), color="#4C72B0")
    ax.set_xlabel("relative injection position in the answer")
    ax.set_ylabel("rows")
    ax.set_title("Where violations were injected")
    _fixed_margins(fig, left=0.75, right=0.15, bottom=0.55, top=0.35)
    return fig, 100


def categories_figure(plt: Any, counts: list[tuple[str, int]]) -> tuple[Any, int]:
    """Horizontal bars of kept injected rows per category (``counts`` most frequent first), and
    its dpi."""
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.28 * len(counts) + 1)))
    ax.barh([k for k, _ in counts][::-1], [v for _, v in counts][::-1], color="#DD8452")
    ax.set_xlabel("kept injected rows")
    ax.set_title("Categories")
    longest = max((len(k) for k, _ in counts), default=0)
    # tick labels at 10 pt: ~0.6 of the size per character, capped so the bars keep half the width
    _fixed_margins(fig, left=min(3.0, 0.2 + longest * 10 * 0.6 / 72), right=0.25, bottom=0.55, top=0.35)
    return fig, 100


def scores_figure(
    plt: Any, classifier: str, targets: list[tuple[str, np.ndarray, float | None]]
) -> tuple[Any, int]:
    """One score histogram per (target, scores, threshold) of ``classifier``, side by side, the
    threshold dashed; and its dpi."""
    fig, axes = plt.subplots(1, len(targets), figsize=(3.2 * len(targets), 2.8), squeeze=False)
    for ax, (target, scores, threshold) in zip(axes[0], targets, strict=True):
        ax.hist(scores if len(scores) else np.zeros(1), bins=20, range=(0, 1), color="#4C72B0")
        if threshold is not None:
            ax.axvline(threshold, color="#C44E52", linestyle="--", linewidth=1)
        ax.set_title(f"{target} (n={len(scores)})", fontsize=9)
        ax.set_xlabel("score", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("rows", fontsize=8)
    fig.suptitle(f"Scores of classifier {classifier} (dashed: threshold)", fontsize=10)
    _fixed_margins(fig, left=0.6, right=0.15, bottom=0.45, top=0.6, wspace=0.2)
    return fig, 90


def asr_figure(
    plt: Any, attacks: list[str], rates: dict[str, list[dict[str, float] | None]]
) -> tuple[Any, int]:
    """Grouped bars of the attack success rate per attack, one bar per model, with the Wilson
    interval as error bars; and its dpi. ``rates``: model -> per attack ``{rate, low, high}``."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(attacks) + 2), 3))
    width = 0.8 / max(1, len(rates))
    for m, (model, values) in enumerate(rates.items()):
        xs = [i + m * width for i in range(len(attacks))]
        ys = [v["rate"] if v else 0.0 for v in values]
        low = [max(0.0, v["rate"] - v["low"]) if v else 0.0 for v in values]
        high = [max(0.0, v["high"] - v["rate"]) if v else 0.0 for v in values]
        ax.bar(xs, ys, width, yerr=[low, high], capsize=3, label=model)
    ax.set_xticks([i + width * (len(rates) - 1) / 2 for i in range(len(attacks))], attacks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("attack success rate")
    ax.set_title("ASR after backtracks (Wilson 95%)")
    ax.legend(fontsize=8)
    _fixed_margins(fig, left=0.7, right=0.15, bottom=0.5, top=0.35)
    return fig, 100


def save(plt: Any, figure: tuple[Any, int], path: Path) -> None:
    """Write a ``*_figure`` as a PNG (no software tag: the bytes depend on the data only)."""
    fig, dpi = figure
    try:
        fig.savefig(path, dpi=dpi, metadata={"Software": None})
    finally:
        plt.close(fig)


def injection_plots(out_dir: Path, stats: Any) -> list[str]:
    """``plots/positions.png`` and ``plots/categories.png`` of kept injections; relative paths."""
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    draw(plot_dir / "positions.png", positions_figure, np.asarray(stats.positions or [0.0]))
    cats = sorted(stats.categories.items(), key=lambda kv: (-kv[1], kv[0]))
    draw(plot_dir / "categories.png", categories_figure, cats)
    return ["plots/positions.png", "plots/categories.png"]
