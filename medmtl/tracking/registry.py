"""Model registry: register a run's model as a new version under alias ``challenger``."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.tracking import MlflowClient

__all__ = ["RegisteredVersion", "register_run_model", "CHALLENGER", "CHAMPION"]

CHALLENGER = "challenger"
CHAMPION = "champion"


@dataclass
class RegisteredVersion:
    """A registered model version."""

    name: str
    version: str
    model_uri: str


def register_run_model(*, tracking_uri: str, run_id: str, name: str, model_uri: str | None = None) -> RegisteredVersion:
    """Register the model logged in ``run_id`` as a new version of ``name`` and point ``challenger`` at it.

    The version carries the run's held-out Dice metrics and lineage tags (run id, config and data
    hashes) and a description, so the registry alone tells where a version came from.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    if model_uri is None:
        models = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        if not models:
            raise LookupError(f"run {run_id} has no logged model; train with tracking.log_model=true")
        model_uri = f"models:/{models[0].model_id}"
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises RestException/MlflowException for a missing model
        client.create_registered_model(name, description="medmtl joint CT+MR segmentation (two-column network)")
    dice = {k: v for k, v in run.data.metrics.items() if k.startswith("test/dice/")}
    lineage = {k: v for k, v in run.data.tags.items() if k.startswith("medmtl.")}
    desc_lines = [f"Trained in run {run_id} ({run.info.run_name})."]
    desc_lines += [f"{k}: {v:.3f}" for k, v in sorted(dice.items())]
    mv = client.create_model_version(
        name, model_uri, run_id=run_id, tags={"source_run_id": run_id, **lineage, **{k: f"{v:.4f}" for k, v in dice.items()}},
        description="\n".join(desc_lines),
    )
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return RegisteredVersion(name=name, version=str(mv.version), model_uri=f"models:/{name}/{mv.version}")
