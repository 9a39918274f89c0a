"""The multi-task gain over single-task baselines, delta_m (Maninis et al. 2019; Vandenhende et al. 2021).

``delta_m = 1/T sum_t 1/|J_t| sum_j (-1)^{l_j} (M_{mtl,t,j} - M_{stl,t,j}) / M_{stl,t,j}``, in percent,
where ``t`` runs over tasks (here the CT and the MR segmentation), ``j`` over the metrics of a task
(mean Dice, mean HD95) and ``l_j = 1`` when lower is better (HD95), so that a positive delta_m always
means the multi-task model is better. A task whose own term is negative suffers negative transfer.
Several runs on either side (seeds) are averaged metric by metric first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LOWER_IS_BETTER", "DeltaM", "delta_m", "average_runs"]

LOWER_IS_BETTER = frozenset({"hd95"})


@dataclass
class DeltaM:
    """``value`` (percent), the per-task terms and the per-(task, metric) relative changes."""

    value: float
    per_task: dict[str, float]
    per_metric: dict[str, dict[str, float]]

    @property
    def negative_transfer(self) -> list[str]:
        """Tasks whose own term is below zero."""
        return [t for t, v in self.per_task.items() if v < 0]


def average_runs(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Metric-wise mean over runs (``task -> metric -> value``); only metrics present in every run."""
    if not runs:
        raise ValueError("no runs to average")
    tasks = set.intersection(*(set(r) for r in runs))
    out = {}
    for t in sorted(tasks):
        metrics = set.intersection(*(set(r[t]) for r in runs))
        out[t] = {m: float(np.mean([r[t][m] for r in runs])) for m in sorted(metrics)}
    return out


def delta_m(mtl: dict[str, dict[str, float]], stl: dict[str, dict[str, float]]) -> DeltaM:
    """delta_m of ``mtl`` against ``stl``, both ``task -> metric -> value`` (e.g. ``{"ct": {"dice": .9, "hd95": 4.}}``)."""
    per_metric: dict[str, dict[str, float]] = {}
    for t, metrics in stl.items():
        if t not in mtl:
            raise KeyError(f"task {t!r} has a baseline but no multi-task value")
        per_metric[t] = {}
        for j, base in metrics.items():
            if j not in mtl[t]:
                raise KeyError(f"metric {j!r} of task {t!r} has a baseline but no multi-task value")
            if base == 0:
                raise ValueError(f"baseline {t}/{j} is 0; the relative change is undefined")
            sign = -1.0 if j in LOWER_IS_BETTER else 1.0
            per_metric[t][j] = 100.0 * sign * (mtl[t][j] - base) / base
    per_task = {t: float(np.mean(list(v.values()))) for t, v in per_metric.items()}
    return DeltaM(value=float(np.mean(list(per_task.values()))), per_task=per_task, per_metric=per_metric)
