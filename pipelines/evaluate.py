"""Evaluate a finished run's model on its held-out cases: Dice and HD95 per class, overlays, logged to the run."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import nibabel as nib
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from medmtl.data.loaders import load_split
from medmtl.data.transforms import RemapLabels
from medmtl.evaluation.metrics import dice_per_class, hd95_per_class, mean_ignoring_nan
from medmtl.tracking.logger import RunLogger
from medmtl.tracking.store import resolve_tracking_uri, using_tracking_uri


@dataclass
class EvalResult:
    """Mean Dice and HD95 (mm) per class per modality, plus per-case rows."""

    run_id: str
    dice: dict[str, dict[str, float]]
    hd95: dict[str, dict[str, float]]
    per_case: list[dict]


def _load_run_model(client: MlflowClient, run_id: str):
    run = client.get_run(run_id)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    if not models:
        raise LookupError(f"run {run_id} has no logged model; train with tracking.log_model=true")
    return run, mlflow.pyfunc.load_model(f"models:/{models[0].model_id}").unwrap_python_model()


def run_evaluation(run_id: str, *, tracking_uri: str | None = None, data_root: str | None = None, overlays: int = 2) -> EvalResult:
    """Sliding-window inference on the run's evaluation cases (test split, else validation) at their original resolution.

    Logs ``eval/dice/<modality>/<class>`` and ``eval/hd95/<modality>/<class>`` to the run, the per-case
    table as ``evaluation/eval_per_case.json`` and overlay pictures under ``overlays/``.
    """
    uri = resolve_tracking_uri(tracking_uri)[0]
    client = MlflowClient(tracking_uri=uri)
    with using_tracking_uri(uri):  # loading a models:/ URI reads MLflow's global URI
        run, model = _load_run_model(client, run_id)
    cfg, seg = model.cfg, model.segmenter
    if data_root is not None:
        cfg = cfg.model_copy(deep=True)
        cfg.data.root = data_root
    data_dir, split = load_split(cfg)
    rows, dice, hd = [], {}, {}
    for m, entries in split.evaluation.items():
        names = list(cfg.data.labels[m].values())
        remap = RemapLabels(cfg.data.labels[m])
        for e in entries:
            pred = seg.predict(data_dir / e.image, m)
            ref_img = nib.load(str(data_dir / e.label))
            ref = remap(torch.as_tensor(np.asarray(ref_img.dataobj))).numpy()
            d = dice_per_class(pred.class_indices, ref, len(names))
            h = hd95_per_class(pred.class_indices, ref, len(names), tuple(float(z) for z in ref_img.header.get_zooms()[:3]))
            rows.append({"case_id": e.case_id, "modality": m, **{f"dice/{n}": float(v) for n, v in zip(names, d)},
                         **{f"hd95/{n}": float(v) for n, v in zip(names, h)}})
        mine = [r for r in rows if r["modality"] == m]
        dice[m] = {n: mean_ignoring_nan([r[f"dice/{n}"] for r in mine]) for n in names}
        hd[m] = {n: mean_ignoring_nan([r[f"hd95/{n}"] for r in mine]) for n in names}
        dice[m]["mean"], hd[m]["mean"] = mean_ignoring_nan(list(dice[m].values())), mean_ignoring_nan(list(hd[m].values()))
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
