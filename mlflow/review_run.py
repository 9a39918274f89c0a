"""What a reviewer checks on the newest run of an experiment, read through the tracking API, as JSON.

    python mlflow/review_run.py TRACKING_URI [EXPERIMENT]

TRACKING_URI is the embedded store (``sqlite:///mlflow/mlflow.db``) or a server (``http://...``). The output
names the run, its ``test/`` metrics (only with a real test split), validation points per Dice metric, the
description's length, dataset inputs and their digest, any ``tracking.*`` params (there should be none), the
logged model with the metrics linked to it and the registered versions.
"""

import json
import sys

from mlflow.tracking import MlflowClient


def review(uri: str, experiment: str = "medmtl-demo") -> dict:
    """The newest run of ``experiment`` at ``uri`` as a dict of what a reviewer checks (see the module docstring)."""
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment} in {uri}")
    run = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    m = run.data.metrics
    dice_keys = [k for k in m if k.startswith("val/dice/")]
    points = {k: len(c.get_metric_history(run.info.run_id, k)) for k in dice_keys}
    models = c.search_logged_models(experiment_ids=[exp.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    vers = c.search_model_versions(f"run_id = '{run.info.run_id}'")
    out = {
        "run_name": run.info.run_name,
        "test_fraction_param": run.data.params.get("data.test_fraction"),
        "test_metrics": sorted(k for k in m if k.startswith("test/"))[:4],
        "min_val_points_per_dice_metric": min(points.values()) if points else 0,
        "description_chars": len(run.data.tags.get("mlflow.note.content", "")),
        "dataset_inputs": [(d.dataset.name, d.dataset.digest, [t.value for t in d.tags]) for d in run.inputs.dataset_inputs],
        "manifest_sha_tag": run.data.tags.get("medmtl.manifest_sha"),
        "tracking_params": [k for k in run.data.params if k.startswith("tracking.")],
        "logged_model": models[0].model_id if models else None,
        "logged_model_metrics": sorted({x.key for x in (models[0].metrics or [])})[:4] if models else [],
        "logged_model_versions_tag": models[0].tags.get("mlflow.modelVersions") if models else None,
        "versions": [(v.name, v.version, getattr(v, "model_id", None)) for v in vers],
        "user": run.info.user_id, "source": run.data.tags.get("mlflow.source.name"),
    }
    return out


if __name__ == "__main__":
    print(json.dumps(review(sys.argv[1], *sys.argv[2:3]), indent=1))
