"""What one tracked run holds: params, lineage tags, metrics per step and per validation, system metrics,
plots, overlays, the PHI-free ingest summary and a deployable model."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from medmtl.tracking.plots import history_figures

pytestmark = pytest.mark.slow


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_run_holds_params_tags_metrics_pictures_and_model(trained, store):
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(trained["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "4" and not any(k.startswith("tracking.") for k in run.data.params)
    for tag in ("medmtl.version", "medmtl.code_version", "medmtl.manifest_sha", "medmtl.plan_sha", "medmtl.eval_set_sha",
                "medmtl.precision", "medmtl.world_size", "medmtl.best_step", "mlflow.note.content"):
        assert run.data.tags.get(tag), tag
    for key in ("loss/ct", "weight/mr", "gradnorm/G/ct", "penalty/soft/enc0", "cross_stitch/enc1/ct_mr", "val/dice/ct/liver",
                "test/dice/mr/mean", "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/mr")] == [1, 2, 3, 4]

    names = set(_artifacts(client, run.info.run_id))
    assert {"config.yaml", "plan.json", "ingest_summary.json", "evaluation/test_dice.json",
            "plots/losses.png", "plots/task_weights.png", "plots/cross_stitch.png", "plots/validation.png",
            "plots/dice_per_organ.png", "ingest/report.json"} <= names
    overlays = sorted(n for n in names if n.startswith("overlays/"))
    assert [n.split("/")[1][:3] for n in overlays] == ["ct_", "mr_"]  # one held-out case per modality (overlay_cases=1)
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="ingest_summary.json", tracking_uri=store)
    summary = json.loads(open(path).read())
    assert set(summary) >= {"train_images", "heldout_images"}
    assert client.search_logged_models(experiment_ids=[run.info.experiment_id])


def test_history_plots_group_metric_families():
    history = [{"step": s, "loss/ct": 1.0 / s, "loss/mr": 2.0 / s, "weight/ct": 1.0, "weight/mr": 1.0, "optimizer/lr": 0.1,
                "cross_stitch/enc1/ct_mr": 0.1 * s, "penalty/soft/enc0": 0.01} for s in range(1, 6)]
    figs = history_figures(history)
    assert {"losses", "task_weights", "optimizer", "cross_stitch", "penalties"} <= set(figs)
    ax = figs["losses"].axes[0]
    assert sorted(line.get_label() for line in ax.get_lines()) == ["loss/ct", "loss/mr"]
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), [1, 2, 3, 4, 5])
