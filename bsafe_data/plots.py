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
        fig, ax = plt.subplots(figsize=(1, 1))
        ax.set_title("warm")  # loads the font the plots use
        fig.savefig(io.BytesIO(), format="png", dpi=10)
        plt.close(fig)
    except Exception:  # only a head start: the plot itself meets the failure, where it is handled
        return


def _import_pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def warm_up() -> None:
    """Import matplotlib and load its font on a thread (once per process), while a build or a
    refilter does other work: that first use costs ~0.5 s, which would otherwise come after a
    build's last answer. ``pyplot()`` waits for it: pyplot is not thread-safe."""
    global _warming
    with _warming_lock:
        if _warming is None and "matplotlib.pyplot" not in sys.modules:
            _warming = threading.Thread(target=_warm, name="bsafe-plots-warm-up", daemon=True)
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


def injection_plots(out_dir: Path, stats: Any) -> list[str]:
    """``plots/positions.png`` and ``plots/categories.png`` of kept injections; relative paths."""
    plt = pyplot()

    plot_dir = out_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6, 3))
    # an array: matplotlib walks a list value by value (seconds at a million rows)
    ax.hist(np.asarray(stats.positions or [0.0]), bins=20, range=(0, 1), color="#4C72B0")
    ax.set_xlabel("relative injection position in the answer")
    ax.set_ylabel("rows")
    ax.set_title("Where violations were injected")
    fig.tight_layout()
    fig.savefig(plot_dir / "positions.png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    written.append("plots/positions.png")
    cats = sorted(stats.categories.items(), key=lambda kv: (-kv[1], kv[0]))
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.28 * len(cats) + 1)))
    ax.barh([k for k, _ in cats][::-1], [v for _, v in cats][::-1], color="#DD8452")
    ax.set_xlabel("kept injected rows")
    ax.set_title("Categories")
    fig.tight_layout()
    fig.savefig(plot_dir / "categories.png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    written.append("plots/categories.png")
    return written
