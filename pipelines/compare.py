"""Gain over single-task baselines: delta_m of multi-task runs against baseline runs, logged to each run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from medmtl.evaluation.delta_m import DeltaM, average_runs, delta_m
from medmtl.errors import TrackingError
from medmtl.tracking.store import get_run, resolve_tracking_uri

METRICS = {"dice": "dice", "hd95": "hd95"}


def run_metrics(client: MlflowClient, run_id: str) -> dict[str, dict[str, float]]:
    """``task -> {"dice": mean Dice, "hd95": mean HD95}`` from a run's ``eval/`` metrics (``test/`` Dice as fallback)."""
    m = get_run(client, run_id).data.metrics
    out: dict[str, dict[str, float]] = {}
    for task in ("ct", "mr"):
        vals = {}
        for name in METRICS:
            for key in (f"eval/{name}/{task}/mean", f"test/{name}/{task}/mean"):
                if key in m:
                    vals[name] = m[key]
                    break
        if vals:
            out[task] = vals
    if not out:
        raise TrackingError(f"run {run_id} has no eval/ or test/ metrics; run `medmtl evaluate {run_id}` first")
    return out


def run_compare(run_ids: list[str], baseline_ids: list[str], *, tracking_uri: str | None = None) -> DeltaM:
    """delta_m of the mean of ``run_ids`` against the mean of ``baseline_ids``; logs table and plot to each run."""
    uri = resolve_tracking_uri(tracking_uri)[0]
    client = MlflowClient(tracking_uri=uri)
    mtl = average_runs([run_metrics(client, r) for r in run_ids])
    stl = average_runs([run_metrics(client, r) for r in baseline_ids])
    # compare only what both sides measured
    common = {t: {j: stl[t][j] for j in stl[t] if j in mtl.get(t, {})} for t in stl if t in mtl}
    result = delta_m(mtl, common)
    table = {"runs": run_ids, "baselines": baseline_ids, "mtl": mtl, "stl": common, "delta_m_percent": result.value,
             "per_task_percent": result.per_task, "per_metric_percent": result.per_metric,
             "negative_transfer": result.negative_transfer}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "delta_m.json"
        path.write_text(json.dumps(table, indent=2))
        png = Path(tmp) / "delta_m.png"
        _plot(result, png)
        for r in run_ids:
            client.log_artifact(r, str(path), artifact_path="compare")
            client.log_artifact(r, str(png), artifact_path="compare")
            client.log_metric(r, "compare/delta_m", result.value)
            for t, v in result.per_task.items():
                client.log_metric(r, f"compare/delta/{t}", v)
            client.set_tag(r, "medmtl.negative_transfer", ",".join(result.negative_transfer) or "none")
    return result


def _plot(result: DeltaM, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for t, per in result.per_metric.items():
        for j, v in per.items():
            labels.append(f"{t.upper()} {j}")
            values.append(v)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(labels, values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("relative change vs single-task (%)")
    ax.set_title(f"delta_m = {result.value:+.2f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
