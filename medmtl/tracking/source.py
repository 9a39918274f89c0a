"""A trained model's parts (config, weights, plan) from a run id, a checkpoint or a model URI.

``medmtl adapt`` starts from any of the three:

* a ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``models:/<model id>`` or ``runs:/<run id>/model`` URI:
  the logged pyfunc model (config, weights and plan as deployed; LoRA deltas already merged);
* an MLflow run id: that run's logged model;
* a checkpoint file (``runs/<run id>/last.pt`` or ``best.pt``): its weights, with the config and plan that
  its run logged (the checkpoint records the run id).

The weights are returned as the plain two-column net they define (:func:`~medmtl.models.merge.merge_adapters`
applied), so the caller never sees adapter wrappers of an earlier adaptation.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from medmtl.config import ExperimentConfig, validate_config
from medmtl.data.plan import Plan, load_plan
from medmtl.errors import ModelError
from medmtl.models.merge import merge_adapters
from medmtl.models.two_column import TwoColumnNet
from medmtl.tracking.store import using_tracking_uri

__all__ = ["SourceModel", "load_source_model"]


@dataclass
class SourceModel:
    """A trained model: its (plain) config, its state dict, its plan, the run it came from and what was given."""

    cfg: ExperimentConfig
    state: dict[str, torch.Tensor]
    plan: Plan
    run_id: str | None
    source: str


def _plain(cfg: ExperimentConfig, state: dict, plan: Plan, run_id: str | None, source: str) -> SourceModel:
    net = TwoColumnNet(cfg=cfg)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"{source}: the weights do not fit the model's own config ({str(err).splitlines()[0]})") from None
    net, cfg = merge_adapters(net, cfg)
    return SourceModel(cfg=cfg, state={k: v.detach().cpu() for k, v in net.state_dict().items()}, plan=plan, run_id=run_id, source=source)


def _from_checkpoint(path: Path, tracking_uri: str) -> SourceModel:
    from mlflow.tracking import MlflowClient

    state = torch.load(path, map_location="cpu", weights_only=True)
    run_id = state.get("run_id") if isinstance(state, dict) else None
    if not run_id or "net" not in state:
        raise ModelError(f"checkpoint {path}: no run id or weights in it; pass the run id or a models:/ URI instead")
    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg_path = client.download_artifacts(run_id, "config.yaml", tmp)
            plan_path = client.download_artifacts(run_id, "plan.json", tmp)
        except Exception as err:  # noqa: BLE001 - any MLflow failure means the same thing to the user
            raise ModelError(f"checkpoint {path}: cannot read config.yaml and plan.json of its run {run_id} from {tracking_uri} ({err})") from None
        cfg = validate_config(yaml.safe_load(Path(cfg_path).read_text()), f"run {run_id} config.yaml")
        plan = load_plan(plan_path)
    return _plain(cfg, state["net"], plan, run_id, str(path))


def _from_model_uri(uri: str, tracking_uri: str) -> SourceModel:
    import mlflow

    from medmtl.tracking.model_loading import load_verified_model

    # files checked against the recorded manifest digest before MLflow runs any of them (one-line ModelError)
    model = load_verified_model(uri, tracking_uri).unwrap_python_model()
    with using_tracking_uri(tracking_uri):
        try:
            info = mlflow.models.get_model_info(uri)
        except Exception as err:  # noqa: BLE001
            raise ModelError(f"model {uri}: cannot be loaded from {tracking_uri} ({str(err).splitlines()[0]}); "
                             "check the name, version or alias (`mlflow models` or the UI list them)") from None
    net = model.segmenter.net
    return _plain(model.cfg, net.state_dict(), model.segmenter.plan, info.run_id, uri)


def _from_run(run_id: str, tracking_uri: str) -> SourceModel:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ModelError(f"{run_id!r} is no run in {tracking_uri}, no checkpoint file and no models:/ or runs:/ URI") from None
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    if not models:
        raise ModelError(f"run {run_id} has no logged model; pass one of its checkpoints (runs/{run_id}/last.pt) instead")
    found = _from_model_uri(f"models:/{models[0].model_id}", tracking_uri)
    found.source = run_id
    return found


def load_source_model(source: str, *, tracking_uri: str) -> SourceModel:
    """Resolve ``source`` (model URI, checkpoint file or run id, in that order) into a :class:`SourceModel`."""
    if source.startswith(("models:/", "runs:/")):
        return _from_model_uri(source, tracking_uri)
    if Path(source).is_file():
        return _from_checkpoint(Path(source), tracking_uri)
    return _from_run(source, tracking_uri)

