"""PNG plots of a built dataset (matplotlib, headless): written next to the card, embedded by it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def injection_plots(out_dir: Path, stats: Any) -> list[str]:
    """``plots/positions.png`` and ``plots/categories.png`` of kept injections; relative paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
