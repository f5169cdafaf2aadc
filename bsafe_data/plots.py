"""PNG plots of a built dataset (matplotlib, headless): written next to the card, embedded by it."""

from __future__ import annotations

import io
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

_warming: threading.Thread | None = None
_warming_lock = threading.Lock()


def _warm() -> None:
    try:
        plt = _import_pyplot()
        # the figures the writer draws, on stand-in data: every font size, artist and the PNG
        # encoder are loaded here, not after a build's last answer
        figures = [
            positions_figure(plt, np.linspace(0, 1, 50)),
            categories_figure(plt, [("warm-up", 1)]),
            scores_figure(plt, "warm-up", [("target", np.linspace(0, 1, 50), 0.5)]),
        ]
        for fig, dpi in figures:
            fig.savefig(io.BytesIO(), format="png", dpi=dpi)
            plt.close(fig)
    except Exception:  # only a head start: the plot itself meets the failure, where it is handled
        return


def _import_pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def warm_up() -> None:
    """Import matplotlib and draw the writer's figures on stand-in data on a thread (once per
    process), while a build or a refilter does other work: that first use costs ~0.5 s, which
    would otherwise come after a build's last answer. ``pyplot()`` waits for it: pyplot is not
    thread-safe."""
    global _warming
    with _warming_lock:
        if _warming is None and "matplotlib.pyplot" not in sys.modules:
            # not a daemon: interpreter exit waits for it (a daemon thread stopped inside
            # matplotlib's C++ code at exit aborts the process)
            _warming = threading.Thread(target=_warm, name="bsafe-plots-warm-up")
            _warming.start()


def warmed_up() -> None:
    """Wait for a started warm-up (before drawing, or before forking: a child must not inherit a
    thread half-way through an import)."""
    if _warming is not None:
        _warming.join()


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless Agg backend, once any warm-up has finished."""
    warmed_up()
    return _import_pyplot()


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


def save(plt: Any, figure: tuple[Any, int], path: Path) -> None:
    """Write a ``*_figure`` as a PNG (no software tag: the bytes depend on the data only)."""
    fig, dpi = figure
    try:
        fig.savefig(path, dpi=dpi, metadata={"Software": None})
    finally:
        plt.close(fig)


def injection_plots(out_dir: Path, stats: Any) -> list[str]:
    """``plots/positions.png`` and ``plots/categories.png`` of kept injections; relative paths."""
    plt = pyplot()

    plot_dir = out_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    save(plt, positions_figure(plt, np.asarray(stats.positions or [0.0])), plot_dir / "positions.png")
    cats = sorted(stats.categories.items(), key=lambda kv: (-kv[1], kv[0]))
    save(plt, categories_figure(plt, cats), plot_dir / "categories.png")
    return ["plots/positions.png", "plots/categories.png"]
