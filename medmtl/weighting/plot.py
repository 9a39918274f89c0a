"""A picture of the task weights over training, for the run's artifacts.

Drawn with matplotlib's object API on the Agg canvas: no pyplot global state and no display, so it
is safe in a training process, a worker or a headless server.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["plot_weights"]


def plot_weights(history: list[dict[str, float]], path: str | Path, *, prefix: str = "weight/", title: str | None = None) -> Path:
    """Write a PNG of every ``prefix*`` series in ``history`` (one dict per step, step 1 first).

    Args:
        history: the trainer's per-step metric dicts (``TrainSummary.history``), x from their ``"step"``
            key (else 1, 2, ...); a key missing at a step leaves a gap.
        path: PNG file to write (parent folders are created).
        prefix: which keys to draw; ``"weight/"`` gives one line per task.
        title: figure title; defaults to ``"task weights"``.

    Returns:
        ``path``. Raises ``ValueError`` when no key of ``history`` starts with ``prefix``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted({k for row in history for k in row if k.startswith(prefix)})
    if not keys:
        raise ValueError(f"no metric starting with {prefix!r} in the history ({len(history)} steps); nothing to plot")
    # the trainer records each row's step (a resumed run's history does not start at 1)
    steps = [float(row.get("step", i + 1)) for i, row in enumerate(history)]
    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key in keys:
        ax.plot(steps, [float(row.get(key, math.nan)) for row in history], label=key.removeprefix(prefix), linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("weight")
    ax.set_title(title or "task weights")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
