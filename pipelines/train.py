"""Train one experiment and track it in MLflow: plan -> run -> train -> held-out evaluation -> model."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import medmtl
from medmtl.config import ExperimentConfig, config_to_yaml, flatten_config
from medmtl.data.loaders import load_split
from medmtl.data.plan import compute_plan, load_plan, save_plan
from medmtl.tracking.logger import RunLogger
from medmtl.tracking.pyfunc_model import log_segmentation_model
from medmtl.tracking.store import ensure_experiment, resolve_tracking_uri
from medmtl.training.trainer import Trainer


@dataclass
class TrainResult:
    """Identifiers and held-out scores of a finished run."""

    run_id: str
    tracking_uri: str
    model_uri: str | None
    test_dice: dict[str, dict[str, float]]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _code_version() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ensure_plan(data_dir: Path) -> Path:
    """``DATA_DIR/plan.json``, computed once from the manifest when missing."""
    path = data_dir / "plan.json"
    if not path.exists():
        save_plan(compute_plan(data_dir), path)
    return path


def run_training(cfg: ExperimentConfig, *, out_dir: str | Path = "runs", progress: bool = True) -> TrainResult:
    """Train ``cfg`` end to end and return the MLflow run id and held-out Dice."""
    data_dir, split = load_split(cfg)
    plan_path = ensure_plan(data_dir)
    plan = load_plan(plan_path)
    tracking_uri, artifact_root = resolve_tracking_uri(cfg.tracking.tracking_uri)
    experiment_id = ensure_experiment(cfg.tracking.experiment, tracking_uri, artifact_root)
    tags = {
        "medmtl.version": medmtl.__version__, "medmtl.code_version": _code_version(),
        "medmtl.manifest_sha": _sha(data_dir / "manifest.jsonl"), "medmtl.plan_sha": _sha(plan_path),
        "medmtl.precision": cfg.train.precision, "medmtl.world_size": "1",
        "medmtl.sharing": "+".join(m.kind for m in cfg.sharing) or "single_task", "medmtl.weighting": cfg.weighting.method,
    }
    logger = RunLogger(tracking_uri=tracking_uri, experiment_id=experiment_id, run_name=cfg.name, tags=tags)
    try:
        logger.log_params(flatten_config(cfg))
        logger.log_text(config_to_yaml(cfg), "config.yaml")
        logger.log_artifact(plan_path)
        logger.log_dict(_ingest_summary(data_dir, split), "ingest_summary.json")
        trainer = Trainer(cfg=cfg, plan=plan, split=split, data_dir=data_dir, logger=logger,
                          out_dir=Path(out_dir) / logger.run_id, progress=progress)
        summary = trainer.train()
        test = summary.validation if summary.validation is not None else trainer.validate()
        logger.log_metrics(test.metrics(prefix="test/"), step=summary.steps)
        logger.log_dict({"per_case": test.per_case, "mean_dice": test.mean_dice}, "evaluation/test_dice.json")
        logger.log_metrics({"train/seconds": summary.seconds, "train/skipped_steps": summary.skipped_steps}, step=summary.steps)
        logger.flush()
        model_uri = None
        if cfg.tracking.log_model:
            names = list(dict.fromkeys(list(cfg.data.labels["ct"].values()) + list(cfg.data.labels["mr"].values())))
            model_uri = log_segmentation_model(run_id=logger.run_id, tracking_uri=tracking_uri, net=trainer.net,
                                               cfg_yaml=config_to_yaml(cfg), plan=plan.to_dict(), class_names=names)
        logger.end("FINISHED")
    except BaseException:
        logger.end("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    return TrainResult(run_id=logger.run_id, tracking_uri=tracking_uri, model_uri=model_uri, test_dice=test.mean_dice)


def _ingest_summary(data_dir: Path, split) -> dict:
    """Counts only: the ingest report itself stays beside the data."""
    return {
        "train_images": {m: len(v) for m, v in split.train.items()},
        "heldout_images": {m: len(v) for m, v in split.val.items()},
        "train_cases": {m: len({e.case_id for e in v}) for m, v in split.train.items()},
    }
