"""Train one experiment and track it in MLflow: plan -> run -> train -> held-out evaluation -> model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import medmtl
from medmtl.config import ExperimentConfig, config_to_yaml, flatten_config
from medmtl.data.loaders import load_split
from medmtl.data.plan import PLAN_VERSION, compute_plan, load_plan, resolve_plan, save_plan
from medmtl.tracking.logger import NullLogger, RunLogger, last_logged_steps
from medmtl.evaluation.inference import Segmenter
from medmtl.tracking.plots import log_history_plots, log_overlays
from medmtl.tracking.pyfunc_model import log_segmentation_model
from medmtl.tracking.registry import EVAL_SET_TAG, eval_set_fingerprint
from medmtl.tracking.store import apply_http_settings, ensure_experiment, resolve_tracking_uri
from medmtl.tracking.system_metrics import start_system_metrics
from medmtl.training.checkpoint import load_checkpoint
from medmtl.training.distributed import init_distributed
from medmtl.training.precision import resolve_device
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


def ensure_plan(data_dir: Path, cfg: ExperimentConfig | None = None) -> Path:
    """``DATA_DIR/plan.json``, computed from the manifest when missing or written by another plan version."""
    path = data_dir / "plan.json"
    stale = False
    if path.exists():
        try:
            stale = json.loads(path.read_text()).get("version", 1) != PLAN_VERSION
        except json.JSONDecodeError:
            stale = True
    if not path.exists() or stale:
        save_plan(compute_plan(data_dir, cfg), path)
    return path


def run_training(cfg: ExperimentConfig, *, out_dir: str | Path = "runs", progress: bool = True,
                 resume: str | Path | None = None) -> TrainResult:
    """Train ``cfg`` end to end and return the MLflow run id and held-out Dice.

    Under ``torchrun`` every rank trains on its shard; only rank 0 talks to MLflow and writes
    checkpoints. ``resume`` (a ``last.pt``) continues the same MLflow run without duplicated steps.
    """
    ctx = init_distributed(resolve_device(cfg.train.device).type)
    data_dir, split = load_split(cfg)
    plan_path = ensure_plan(data_dir, cfg)
    # the plan as this run uses it (config overrides applied): trained, logged and shipped with the model
    plan = resolve_plan(load_plan(plan_path), cfg)
    state = load_checkpoint(resume) if resume is not None else None
    tracking_uri, run_id, logged = "", None, {}
    logger: RunLogger | NullLogger = NullLogger()
    sampler = None
    if ctx.is_main:
        apply_http_settings(cfg.tracking)  # bounded timeouts and retries for every MLflow request of this process
        tracking_uri, artifact_root = resolve_tracking_uri(cfg.tracking.tracking_uri)
        # creates the embedded store once, here, before the trainer and its loader workers exist
        experiment_id = ensure_experiment(cfg.tracking.experiment, tracking_uri, artifact_root)
        # the run's spool (records not yet on the server) lives beside its checkpoints: <out_dir>/<run_id>/mlflow_spool
        spool_root = Path(resume).parent.parent if resume is not None else Path(out_dir)
        if state is not None:
            logger = RunLogger(tracking_uri=tracking_uri, experiment_id=experiment_id, run_name=cfg.name, run_id=state["run_id"],
                               spool_root=spool_root, settings=cfg.tracking)
            logged = last_logged_steps(tracking_uri, state["run_id"], spool_root=spool_root)
        else:
            tags = {**_tags(cfg, data_dir, plan_path, ctx), EVAL_SET_TAG: eval_set_fingerprint(split.val)}
            logger = RunLogger(tracking_uri=tracking_uri, experiment_id=experiment_id, run_name=cfg.name, tags=tags,
                               spool_root=spool_root, settings=cfg.tracking)
        run_id = logger.run_id
        sampler = start_system_metrics(logger, cfg.tracking)
    try:
        if ctx.is_main and state is None:
            logger.log_params(flatten_config(cfg))
            logger.log_text(config_to_yaml(cfg), "config.yaml")
            logger.log_dict(plan.to_dict(), "plan.json")
            logger.log_dict(_ingest_summary(data_dir, split), "ingest_summary.json")
        ckpt_dir = Path(resume).parent if resume is not None else Path(out_dir) / (run_id or "rank")
        trainer = Trainer(cfg=cfg, plan=plan, split=split, data_dir=data_dir, logger=logger, out_dir=ckpt_dir,
                          progress=progress, dist_ctx=ctx, run_id=run_id, logged_steps=logged)
        if state is not None:
            trainer.load_state_dict(state)
        summary = trainer.train()
        test = summary.validation if summary.validation is not None else trainer.validate()
        model_uri = None
        if ctx.is_main:
            logger.log_metrics(test.metrics(prefix="test/"), step=summary.steps)
            logger.log_dict({"per_case": test.per_case, "mean_dice": test.mean_dice}, "evaluation/test_dice.json")
            logger.log_metrics({"train/seconds": summary.seconds, "train/skipped_steps": summary.skipped_steps}, step=summary.steps)
            log_history_plots(logger, summary.history)
            log_overlays(logger, Segmenter(trainer.net, cfg, plan, device=trainer.device), split.val, data_dir, cfg.data.labels,
                         max_cases=cfg.tracking.overlay_cases)
            if sampler is not None:
                sampler.stop()
            logger.sync()  # give a server that is down a bounded chance to come back before the model upload
            if cfg.tracking.log_model:
                names = list(dict.fromkeys(list(cfg.data.labels["ct"].values()) + list(cfg.data.labels["mr"].values())))
                model_uri = log_segmentation_model(run_id=logger.run_id, tracking_uri=tracking_uri, net=trainer.net,
                                                   cfg_yaml=config_to_yaml(cfg), plan=plan.to_dict(), class_names=names)
            logger.end("FINISHED")
    except BaseException:
        if sampler is not None:
            sampler.stop()
        if ctx.is_main:
            logger.end("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    return TrainResult(run_id=run_id or "", tracking_uri=tracking_uri, model_uri=model_uri, test_dice=test.mean_dice)


def _tags(cfg: ExperimentConfig, data_dir: Path, plan_path: Path, ctx) -> dict[str, str]:
    return {
        "medmtl.version": medmtl.__version__, "medmtl.code_version": _code_version(),
        "medmtl.manifest_sha": _sha(data_dir / "manifest.jsonl"), "medmtl.plan_sha": _sha(plan_path),
        "medmtl.precision": cfg.train.precision, "medmtl.world_size": str(ctx.world_size),
        "medmtl.sharing": "+".join(m.kind for m in cfg.sharing) or "single_task", "medmtl.weighting": cfg.weighting.method,
    }


def _ingest_summary(data_dir: Path, split) -> dict:
    """Counts only: the ingest report itself stays beside the data."""
    return {
        "train_images": {m: len(v) for m, v in split.train.items()},
        "heldout_images": {m: len(v) for m, v in split.val.items()},
        "train_cases": {m: len({e.case_id for e in v}) for m, v in split.train.items()},
    }
