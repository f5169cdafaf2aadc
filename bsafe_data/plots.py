"""PNG plots of a built dataset (matplotlib, headless): written next to the card, embedded by it.

A figure is a ``*_figure`` builder (named in ``FIGURES``) and its data. ``draw`` writes one as a
PNG. Inside ``in_background()`` (the writer's block) the figures go to the *plotter*: a child
process that ``start_plotter`` launches while a build's chunks run (or a refilter decides), which
imports matplotlib and draws stand-in figures there. The first matplotlib use (~0.5 s) and the
drawing itself (~0.1 s a figure) then run on the other core and never hold this process's
interpreter lock, which the generator's event loop and the shard encoders need. Without a running
plotter (or when it fails) the figure is drawn here, with the same code and the same bytes.
"""

from __future__ import annotations

import atexit
import io
import os
import pickle
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

#: a figure builder: ``builder(plt, *data)`` -> (figure, dpi); the plotter gets its name, not code
FigureBuilder = Callable[..., tuple[Any, int]]


#: a figure request: (path, figure name, args)
_Request = tuple[Path, str, tuple[Any, ...]]
#: how long the writer waits for the plotter's answers before drawing the rest itself
_ANSWER_TIMEOUT_S = 60.0


class _Plotter:
    """The child process that draws figures, and the figures it was sent and has not answered.

    Requests are pickled ``(path, figure name, args)`` on its stdin; it answers each, in order,
    with a length-prefixed error text (empty: drawn) on its stdout, read here with ``select`` and
    ``os.read``, so a stuck child costs a timeout, not a hung build, and no thread is needed (a
    later fork of this process, by the processes executor, inherits none). Used only by the
    process that started it."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)  # bsafe_data's parent, for the child's imports
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        self.owner = os.getpid()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bsafe_data.plots"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # matplotlib's warnings are not the user's business here
            env={**os.environ, "PYTHONPATH": path},
        )
        self.sent: list[_Request] = []
        self.ended = False

    @property
    def usable(self) -> bool:
        return os.getpid() == self.owner and not self.ended and self.proc.poll() is None

    def send(self, request: _Request) -> bool:
        """Hand a figure to the child; False when it cannot take it."""
        path, name, args = request
        assert self.proc.stdin is not None
        try:
            pickle.dump((str(path), name, args), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except (OSError, ValueError):  # the child is gone
            self.ended = True
            return False
        self.sent.append(request)
        return True

    def collect(self) -> list[_Request]:
        """Wait for the answers to every figure sent; the requests the child did not draw (with
        all that are left when it ends or does not answer within ``_ANSWER_TIMEOUT_S``: it is
        stopped then)."""
        deadline = time.monotonic() + _ANSWER_TIMEOUT_S
        sent, self.sent = self.sent, []
        failed: list[_Request] = []
        for done, request in enumerate(sent):
            answer = self._answer(deadline)
            if answer is None:  # ended, broken or too slow: the caller draws the rest
                self._stop()
                return failed + sent[done:]
            if answer:
                failed.append(request)
        return failed

    def _answer(self, deadline: float) -> str | None:
        """The next answer ("" drawn, else the error), or None when there is none in time."""
        head = self._read(4, deadline)
        if head is None:
            return None
        body = self._read(struct.unpack("!I", head)[0], deadline)
        return None if body is None else body.decode("utf-8", "replace")

    def _read(self, size: int, deadline: float) -> bytes | None:
        assert self.proc.stdout is not None
        fd, data = self.proc.stdout.fileno(), b""
        while len(data) < size:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, size - len(data)) if ready else b""
            if not chunk:  # timed out, or the child closed its output
                return None
            data += chunk
        return data

    def _stop(self) -> None:
        self.ended = True
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """End the child (at exit): its input closes, it finishes what it was sent and exits."""
        if os.getpid() != self.owner:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self._stop()


_plotter: _Plotter | None = None
_plotter_lock = threading.Lock()
_background = threading.local()


def start_plotter() -> None:
    """Start the plotter process once per process (a no-op while one runs). A build calls it
    before its chunks run, refilter before it reads the folder."""
    global _plotter
    with _plotter_lock:
        if (_plotter is None or not _plotter.usable) and sys.executable:
            try:
                _plotter = _Plotter()
            except OSError:  # no process to be had: figures are drawn here
                _plotter = None
                return
            atexit.register(_plotter.close)


def plotter_pid() -> int | None:
    """The running plotter's process id (None when figures are drawn in this process)."""
    plotter = _plotter
    return plotter.proc.pid if plotter is not None and plotter.usable else None


@contextmanager
def in_background() -> Iterator[None]:
    """Inside the block, ``draw`` hands figures to the plotter (when one runs) and returns; every
    figure is written when the block ends. A figure the plotter could not draw is drawn here
    (where any error surfaces)."""
    _background.active = True
    try:
        yield
    finally:
        _background.active = False
        plotter = _plotter
        if plotter is not None and os.getpid() == plotter.owner:
            for path, name, args in plotter.collect():
                _draw_here(path, name, args)


def draw(path: Path, figure: FigureBuilder, *args: Any) -> None:
    """Write ``figure(plt, *args)`` as a PNG at ``path`` (see ``in_background``; outside it, here)."""
    name = figure.__name__
    assert FIGURES.get(name) is figure, f"{name} is not in FIGURES"
    plotter = _plotter
    if getattr(_background, "active", False) and plotter is not None and plotter.usable:
        if plotter.send((path, name, args)):
            return
    _draw_here(path, name, args)


def _draw_here(path: Path, name: str, args: tuple[Any, ...]) -> None:
    plt = pyplot()
    save(plt, FIGURES[name](plt, *args), path)


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


FIGURES: dict[str, FigureBuilder] = {
    f.__name__: f for f in (positions_figure, categories_figure, scores_figure)
}


def _serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    """The plotter's loop: draw each request and answer it, in order; ends at the end of
    ``requests``. Requests are read on a thread from the start, so a parent's write never waits
    for an import or a drawing."""
    inbox: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        while True:
            try:
                inbox.put(pickle.load(requests))
            except Exception:  # end of input (or a broken parent): stop after what came
                inbox.put(None)
                return

    threading.Thread(target=read, daemon=True).start()
    plt = pyplot()
    # the builders on stand-in data: every font size, artist and the PNG encoder load now
    stand_ins = [
        positions_figure(plt, np.linspace(0, 1, 50)),
        categories_figure(plt, [("warm-up", 1)]),
        scores_figure(plt, "warm-up", [("target", np.linspace(0, 1, 50), 0.5)]),
    ]
    for fig, dpi in stand_ins:
        fig.savefig(io.BytesIO(), format="png", dpi=dpi)
        plt.close(fig)
    while (request := inbox.get()) is not None:
        path, name, args = request
        try:
            save(plt, FIGURES[name](plt, *args), Path(path))
            error = b""
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
        replies.write(struct.pack("!I", len(error)) + error)
        replies.flush()


if __name__ == "__main__":  # the plotter process (``start_plotter``)
    _replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not corrupt the answers
    _serve(sys.stdin.buffer, _replies)
