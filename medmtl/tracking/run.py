"""Rank 0's MLflow side of one training run: opened (or resumed) before training, finished after it.

Other ranks get a run whose logger records nothing and whose :meth:`TrackedRun.finish` does nothing,
so the training pipeline reads the same on every rank.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

import medmtl
from medmtl.config import ExperimentConfig, config_to_yaml, flatten_config
from medmtl.data.loaders import Split
from medmtl.data.plan import Plan
from medmtl.evaluation.evaluate import Evaluation
from medmtl.inference.segmenter import Segmenter
from medmtl.models.merge import merge_adapters
from medmtl.tracking.logger import NullLogger, RunLogger, terminate_run, last_logged_steps
from medmtl.tracking.plots import log_history_plots, log_overlays
from medmtl.inference.pyfunc_model import stage_model
from medmtl.tracking.registry import EVAL_SET_TAG, eval_set_fingerprint
from medmtl.tracking.store import apply_http_settings, ensure_experiment, resolve_tracking_uri
from medmtl.tracking.system_metrics import start_system_metrics
from medmtl.training.distributed import DistributedContext

__all__ = ["TrackedRun", "run_tags", "ingest_summary", "code_version"]

log = logging.getLogger(__name__)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def code_version() -> str:
    """The git commit of the medmtl code that runs, or ``installed-<version>`` when it is not a git checkout.

    The commit is only the project's own when this package's files are tracked in the surrounding work
    tree: a non-editable install inside someone else's checkout (``site-packages`` of a venv in a repo)
    must not tag runs with that repository's HEAD. ``-dirty`` marks uncommitted changes to the package.
    """
    pkg = Path(medmtl.__file__).resolve().parent
    git = ["git", "-C", str(pkg)]
    try:
        run = lambda *a: subprocess.run([*git, *a], capture_output=True, text=True, check=True, timeout=10).stdout.strip()  # noqa: E731
        run("ls-files", "--error-unmatch", "--", str(pkg / "__init__.py"))  # raises unless tracked in this work tree
        sha = run("rev-parse", "--short", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", str(pkg))
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"installed-{medmtl.__version__}"


def run_tags(cfg: ExperimentConfig, data_dir: Path, plan_path: Path, ctx: DistributedContext, split: Split) -> dict[str, str]:
    """Lineage tags of a new run: versions, hashes of manifest, plan and held-out set, precision, world size."""
    return {
        "medmtl.version": medmtl.__version__, "medmtl.code_version": code_version(),
        "medmtl.manifest_sha": _sha(data_dir / "manifest.jsonl"), "medmtl.plan_sha": _sha(plan_path),
        "medmtl.precision": cfg.train.precision, "medmtl.world_size": str(ctx.world_size),
        "medmtl.sharing": "+".join(m.kind for m in cfg.sharing) or "single_task", "medmtl.weighting": cfg.weighting.method,
        EVAL_SET_TAG: eval_set_fingerprint(split.evaluation),
    }


def ingest_summary(split: Split) -> dict:
    """Counts only: the ingest report itself stays beside the data."""
    return {
        "train_images": {m: len(v) for m, v in split.train.items()},
        "heldout_images": {m: len(v) for m, v in split.val.items()},
        "test_images": {m: len(v) for m, v in split.test.items()},
        "train_cases": {m: len({e.case_id for e in v}) for m, v in split.train.items()},
    }


class TrackedRun:
    """The MLflow run of a training job (rank 0), or a silent stand-in (other ranks).

    Attributes:
        logger: what the trainer logs to.
        run_id: the MLflow run id (``None`` on ranks other than 0).
        logged_steps: per metric key, the last step already stored (a resumed run skips those).
        spool_root: the folder holding ``<run_id>/`` (checkpoints and the metric spool).
        unsent_spool: after :meth:`finish`, the spool folder still holding records (``medmtl sync`` sends them).
    """

    def __init__(self, *, cfg: ExperimentConfig, logger, tracking_uri: str = "", logged_steps: dict[str, int] | None = None,
                 spool_root: Path | None = None, sampler=None) -> None:
        self.cfg, self.logger, self.tracking_uri = cfg, logger, tracking_uri
        self.run_id: str | None = getattr(logger, "run_id", None)
        self.logged_steps = logged_steps or {}
        self.spool_root = spool_root
        self.unsent_spool: Path | None = None  # set by finish() when records (model, final status) wait for the server
        self._sampler = sampler

    @classmethod
    def open(cls, cfg: ExperimentConfig, *, ctx: DistributedContext, data_dir: Path, split: Split, plan: Plan, plan_path: Path,
             out_dir: Path, resume_state: dict | None = None, resume_path: Path | None = None,
             tags: dict[str, str] | None = None) -> "TrackedRun":
        """Create the run (params, config, plan, ingest summary) or reattach to the resumed one; ``tags`` are added to a new run."""
        if not ctx.is_main:
            return cls(cfg=cfg, logger=NullLogger())
        apply_http_settings(cfg.tracking)  # bounded timeouts and retries for every MLflow request of this process
        uri, artifact_root = resolve_tracking_uri(cfg.tracking.tracking_uri)
        # creates the embedded store once, here, before the trainer and its loader workers exist
        experiment_id = ensure_experiment(cfg.tracking.experiment, uri, artifact_root)
        # the run's spool (records not yet on the server) lives beside its checkpoints: <out_dir>/<run_id>/mlflow_spool
        spool_root = resume_path.parent.parent if resume_path is not None else out_dir
        common = dict(tracking_uri=uri, experiment_id=experiment_id, run_name=cfg.name, spool_root=spool_root, settings=cfg.tracking)
        if resume_state is not None:
            logger = RunLogger(run_id=resume_state["run_id"], **common)
            logged = last_logged_steps(uri, resume_state["run_id"], spool_root=spool_root)
        else:
            logger = RunLogger(tags={**run_tags(cfg, data_dir, plan_path, ctx, split), **(tags or {})}, **common)
        try:
            if resume_state is None:
                logged = {}
                logger.log_params(flatten_config(cfg))
                logger.log_text(config_to_yaml(cfg), "config.yaml")
                logger.log_dict(plan.to_dict(), "plan.json")
                logger.log_dict(ingest_summary(split), "ingest_summary.json")
            return cls(cfg=cfg, logger=logger, tracking_uri=uri, logged_steps=logged, spool_root=spool_root,
                       sampler=start_system_metrics(logger, cfg.tracking))
        except BaseException:
            logger.end("FAILED")  # the run exists: never leave it RUNNING
            raise

    @property
    def checkpoint_dir(self) -> Path | None:
        """``<out_dir>/<run_id>`` on rank 0."""
        return self.spool_root / self.run_id if self.spool_root is not None and self.run_id else None

    def finish(self, *, trainer, summary, test: Evaluation, plan: Plan, split: Split, data_dir: Path) -> str | None:
        """Held-out Dice, plots, overlays and the deployable model; ends the run. Returns the model URI."""
        if self.run_id is None:
            return None
        cfg, logger = self.cfg, self.logger
        logger.log_metrics(test.metrics(prefix="test/"), step=summary.steps)
        logger.log_dict({"per_case": test.per_case, "mean_dice": test.mean_dice}, "evaluation/test_dice.json")
        timing = {"train/seconds": summary.seconds, "train/skipped_steps": summary.skipped_steps}
        if summary.step_seconds == summary.step_seconds:  # NaN when a resumed run had no step left
            timing["train/step_seconds"] = summary.step_seconds
        logger.log_metrics(timing, step=summary.steps)
        log_history_plots(logger, summary.history)
        log_overlays(logger, Segmenter(trainer.net, cfg, plan, device=trainer.device), split.evaluation, data_dir, cfg.data.labels,
                     max_cases=cfg.tracking.overlay_cases)
        self._stop_sampler()
        if cfg.tracking.log_model:
            # the model goes through the spool like every other record, before the final status: a server
            # that is down at the end gets it (and FINISHED) from `medmtl sync` later
            names = list(dict.fromkeys(list(cfg.data.labels["ct"].values()) + list(cfg.data.labels["mr"].values())))
            # LoRA deltas fold into per-modality kernels: the deployed model has no adapter left to run
            net, model_cfg = merge_adapters(trainer.net, cfg)
            logger.log_model(lambda folder: stage_model(folder, net=net, cfg_yaml=config_to_yaml(model_cfg),
                                                        plan=plan.to_dict(), class_names=names))
        logger.end("FINISHED")
        if logger.unsent:
            self.unsent_spool = logger.spool.folder
        return logger.model_uri

    def fail(self, err: BaseException | None) -> None:
        """End the run as KILLED (Ctrl-C) or FAILED; never raises over ``err`` (a full disk may fail the spool too)."""
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        try:
            self._stop_sampler()
            self.logger.end(status)
        except Exception as why:  # noqa: BLE001 - the caller re-raises the real failure
            log.warning("could not end run %s as %s through its spool (%s); setting it directly", self.run_id, status, why)
            if self.run_id is not None:
                terminate_run(MlflowClient(tracking_uri=self.tracking_uri), self.run_id, status)

    def _stop_sampler(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
