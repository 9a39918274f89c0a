"""Evaluate a finished run's model on its held-out cases: Dice and HD95 per class, overlays, logged to the run."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from medmtl.data.loaders import load_split
from medmtl.errors import ModelError
from medmtl.evaluation.evaluate import evaluate_cases
from medmtl.tracking.logger import RunLogger
from medmtl.tracking.model_loading import load_verified_model
from medmtl.tracking.store import get_run, resolve_tracking_uri, using_tracking_uri


@dataclass
class EvalResult:
    """Mean Dice and HD95 (mm) per class per modality, plus per-case rows."""

    run_id: str
    dice: dict[str, dict[str, float]]
    hd95: dict[str, dict[str, float]]
    per_case: list[dict]


def _load_run_model(client: MlflowClient, run_id: str, uri: str):
    run = get_run(client, run_id)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    if not models:
        raise ModelError(f"run {run_id} has no logged model; train with tracking.log_model=true")
    # files verified against the logged model's manifest digest before MLflow imports any of them
    return run, load_verified_model(f"models:/{models[0].model_id}", uri).unwrap_python_model()


def run_evaluation(run_id: str, *, tracking_uri: str | None = None, data_root: str | None = None, overlays: int = 2) -> EvalResult:
    """Sliding-window inference on the run's evaluation cases (test split, else validation) at their original resolution.

    Logs ``eval/dice/<modality>/<class>`` and ``eval/hd95/<modality>/<class>`` to the run, the per-case
    table as ``evaluation/eval_per_case.json`` and overlay pictures under ``overlays/``.
    """
    uri = resolve_tracking_uri(tracking_uri)[0]
    client = MlflowClient(tracking_uri=uri)
    with using_tracking_uri(uri):  # loading a models:/ URI reads MLflow's global URI
        run, model = _load_run_model(client, run_id, uri)
    cfg, seg = model.cfg, model.segmenter
    if data_root is not None:
        cfg = cfg.model_copy(deep=True)
        cfg.data.root = data_root
    data_dir, split = load_split(cfg)
    ev = evaluate_cases(seg, split.evaluation, data_dir, cfg.data.labels, hd95=True)
    rows, dice, hd = ev.per_case, ev.mean_dice, ev.mean_hd95
    logger = RunLogger(tracking_uri=uri, experiment_id=run.info.experiment_id, run_name=run.info.run_name, run_id=run_id)
    try:
        step = max((int(v) for k, v in run.data.params.items() if k == "train.steps"), default=0)
        metrics = {f"eval/dice/{m}/{n}": v for m, per in dice.items() for n, v in per.items()}
        metrics.update({f"eval/hd95/{m}/{n}": v for m, per in hd.items() for n, v in per.items()})
        logger.log_metrics(metrics, step=step)
        logger.log_dict({"per_case": rows, "dice": dice, "hd95": hd}, "evaluation/eval_per_case.json")
        if overlays > 0:
            from medmtl.tracking.plots import log_overlays

            log_overlays(logger, seg, split.evaluation, data_dir, cfg.data.labels, max_cases=overlays)
    finally:
        logger.end("FINISHED")
    return EvalResult(run_id=run_id, dice=dice, hd95=hd, per_case=rows)
