"""Rank 0's MLflow side of one training run: opened (or resumed) before training, finished after it.

A run explains itself in the UI: a name from config, sharing and weighting; a Markdown description
(data counts, sharing, weighting, then the headline Dice and overlay links); MLflow's user, source and
git tags; the splits as dataset inputs (digest = manifest hash); the ingest report as a table; the
reviewer's params only (no ``tracking.*``, nothing switched off). Final scores are those of ``best.pt``:
on the test split under ``test/`` when there is one, linked to the logged model and the test dataset;
without one, no ``test/`` metric exists and the validation Dice of ``best.pt`` is linked instead.

Other ranks get a run whose logger records nothing and whose :meth:`TrackedRun.finish` does nothing,
so the training pipeline reads the same on every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

import medmtl
from medmtl.config import ExperimentConfig, config_to_yaml
from medmtl.data.loaders import Split
from medmtl.data.plan import Plan
from medmtl.evaluation.evaluate import Evaluation
from medmtl.inference.segmenter import Segmenter
from medmtl.inference.pyfunc_model import stage_model
from medmtl.models.merge import merge_adapters
from medmtl.tracking.describe import (CONTEXTS, dataset_inputs, describe_run, dice_text, ingest_table, reviewer_params,
                                      run_name, standard_tags)
from medmtl.tracking.links import Links, logged_model_id, logged_model_url, mark_model_training, run_url
from medmtl.tracking.logger import LOGGED_MODEL, NullLogger, RunLogger, last_logged_steps, terminate_run
from medmtl.tracking.plots import log_dice_bars, log_history_plots, log_overlays, log_validation_curves
from medmtl.tracking.registry import EVAL_SET_TAG, eval_set_fingerprint
from medmtl.tracking.store import apply_http_settings, ensure_experiment, resolve_tracking_uri
from medmtl.tracking.system_metrics import start_system_metrics
from medmtl.training.distributed import DistributedContext

__all__ = ["TrackedRun", "run_tags", "ingest_summary", "code_version", "INGEST_TABLE"]

INGEST_TABLE = "ingest/report.json"

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
        EVAL_SET_TAG: eval_set_fingerprint(split.evaluation), "medmtl.config": cfg.name,
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
        links: UI pages of the run and, once logged, of its model.
    """

    def __init__(self, *, cfg: ExperimentConfig, logger, tracking_uri: str = "", logged_steps: dict[str, int] | None = None,
                 spool_root: Path | None = None, sampler=None, experiment_id: str | None = None, ingest_line: str | None = None,
                 manifest_sha: str = "") -> None:
        self.cfg, self.logger, self.tracking_uri = cfg, logger, tracking_uri
        self.run_id: str | None = getattr(logger, "run_id", None)
        self.logged_steps = logged_steps or {}
        self.spool_root = spool_root
        self.unsent_spool: Path | None = None  # set by finish() when records (model, final status) wait for the server
        self.experiment_id = experiment_id
        self.ingest_line = ingest_line
        self.manifest_sha = manifest_sha
        self._sampler = sampler
        self.links = Links(run=run_url(tracking_uri, experiment_id, self.run_id) if self.run_id and experiment_id else None)

    @classmethod
    def open(cls, cfg: ExperimentConfig, *, ctx: DistributedContext, data_dir: Path, split: Split, plan: Plan, plan_path: Path,
             out_dir: Path, resume_state: dict | None = None, resume_path: Path | None = None,
             tags: dict[str, str] | None = None) -> "TrackedRun":
        """Create the run (name, description, params, tags, dataset inputs, config, plan, ingest table) or reattach to the resumed one.

        ``tags`` are added to a new run (a study's cell key, for instance).
        """
        if not ctx.is_main:
            return cls(cfg=cfg, logger=NullLogger())
        apply_http_settings(cfg.tracking)  # bounded timeouts and retries for every MLflow request of this process
        uri, artifact_root = resolve_tracking_uri(cfg.tracking.tracking_uri)
        # creates the embedded store once, here, before the trainer and its loader workers exist
        experiment_id = ensure_experiment(cfg.tracking.experiment, uri, artifact_root)
        from mlflow.tracking import MlflowClient

        mark_model_training(MlflowClient(tracking_uri=uri), experiment_id)
        # the run's spool (records not yet on the server) lives beside its checkpoints: <out_dir>/<run_id>/mlflow_spool
        spool_root = resume_path.parent.parent if resume_path is not None else out_dir
        ingest = ingest_table(data_dir)
        manifest_sha = _sha(data_dir / "manifest.jsonl")
        common = dict(tracking_uri=uri, experiment_id=experiment_id, spool_root=spool_root, settings=cfg.tracking)
        if resume_state is not None:
            logger = RunLogger(run_id=resume_state["run_id"], run_name=cfg.name, **common)
            logged = last_logged_steps(uri, resume_state["run_id"], spool_root=spool_root)
        else:
            note = describe_run(cfg, split=split, ingest_summary=ingest[1] if ingest else None)
            all_tags = {**standard_tags(), **run_tags(cfg, data_dir, plan_path, ctx, split), "mlflow.note.content": note, **(tags or {})}
            logger = RunLogger(tags=all_tags, run_name=run_name(cfg), **common)
        try:
            if resume_state is None:
                logged = {}
                logger.log_params(reviewer_params(cfg))
                logger.log_inputs(dataset_inputs(data_dir, split, manifest_sha))
                logger.log_text(config_to_yaml(cfg), "config.yaml")
                logger.log_dict(plan.to_dict(), "plan.json")
                logger.log_dict(ingest_summary(split), "ingest_summary.json")
                if ingest is not None:
                    logger.log_dict(ingest[0], INGEST_TABLE)
                    # MLflow's marker for table artifacts (what mlflow.log_table writes): the UI shows it as a table
                    logger.set_tags({"mlflow.loggedArtifacts": json.dumps([{"path": INGEST_TABLE, "type": "table"}])})
            return cls(cfg=cfg, logger=logger, tracking_uri=uri, logged_steps=logged, spool_root=spool_root,
                       sampler=start_system_metrics(logger, cfg.tracking), experiment_id=experiment_id,
                       ingest_line=ingest[1] if ingest else None, manifest_sha=manifest_sha)
        except BaseException:
            logger.end("FAILED")  # the run exists: never leave it RUNNING
            raise

    @property
    def checkpoint_dir(self) -> Path | None:
        """``<out_dir>/<run_id>`` on rank 0."""
        return self.spool_root / self.run_id if self.spool_root is not None and self.run_id else None

    def finish(self, *, trainer, summary, test: Evaluation | None, validation: Evaluation, plan: Plan, split: Split,
               data_dir: Path) -> str | None:
        """Final scores of ``best.pt``, plots, overlays, the deployable model and the description; ends the run.

        ``test`` is ``best.pt`` on the test split (``None`` without one), ``validation`` on the validation
        split. Returns the model URI.
        """
        if self.run_id is None:
            return None
        cfg, logger = self.cfg, self.logger
        final = test if test is not None else validation
        context = "test" if test is not None else "validation"
        timing = {"train/seconds": summary.seconds, "best_step": float(summary.best_step)}
        if summary.step_seconds == summary.step_seconds:  # NaN when a resumed run had no step left
            timing["train/step_seconds"] = summary.step_seconds
        logger.log_metrics(timing, step=summary.steps)
        logger.log_dict({"set": context, "best_step": summary.best_step, "per_case": final.per_case, "mean_dice": final.mean_dice},
                        f"evaluation/{context}_dice.json")
        log_history_plots(logger, summary.history)
        log_validation_curves(logger, summary.val_history, best_step=summary.best_step)
        log_dice_bars(logger, {"validation": validation.mean_dice, **({"test": test.mean_dice} if test is not None else {})})
        overlays = log_overlays(logger, Segmenter(trainer.net, cfg, plan, device=trainer.device), split.evaluation, data_dir,
                                cfg.data.labels, max_cases=cfg.tracking.overlay_cases, per_case=final.per_case,
                                ct_window=(plan.ct.intensity.get("p00_5"), plan.ct.intensity.get("p99_5")))
        self._stop_sampler()
        if cfg.tracking.log_model:
            # the model goes through the spool like every other record, before the final status: a server
            # that is down at the end gets it (and FINISHED) from `medmtl sync` later
            names = list(dict.fromkeys(list(cfg.data.labels["ct"].values()) + list(cfg.data.labels["mr"].values())))
            # LoRA deltas fold into per-modality kernels: the deployed model has no adapter left to run
            net, model_cfg = merge_adapters(trainer.net, cfg)
            logger.log_model(lambda folder: stage_model(folder, net=net, cfg_yaml=config_to_yaml(model_cfg),
                                                        plan=plan.to_dict(), class_names=names))
        # the final scores are linked to the logged model (its page shows them): LOGGED_MODEL stands for the model id
        # the spool gets when it has uploaded the model above (records are sent in order)
        model_id = LOGGED_MODEL if cfg.tracking.log_model else None
        dataset = (f"{Path(data_dir).name}-{CONTEXTS['test' if test is not None else 'val']}", self.manifest_sha)
        if test is not None:
            # the final scores: best.pt on cases never seen in training or selection, on the model's page too
            logger.log_metrics(test.metrics(prefix="test/"), step=summary.steps, model_id=model_id, dataset=dataset)
        elif model_id:
            # no test set: the model's page shows best.pt's validation Dice (the points already on the run's curve)
            logger.log_metrics(validation.metrics(prefix="val/"), step=summary.best_step, model_id=model_id, dataset=dataset)
        scores_set = (f"test set ({_cases(split.test)})" if test is not None
                      else f"validation set ({_cases(split.val)}; no test set)")
        links = [(Path(p).stem, f"#/experiments/{self.experiment_id}/runs/{self.run_id}/artifacts/{p}") for p in overlays]
        tags = {"mlflow.note.content": describe_run(cfg, split=split, ingest_summary=self.ingest_line, scores=final.mean_dice,
                                                    scores_set=scores_set, best_step=summary.best_step, links=links),
                "medmtl.best_step": str(summary.best_step), "medmtl.scores_set": "test" if test is not None else "validation (no test set)"}
        tags.update({f"medmtl.dice.{m}": dice_text(d["mean"]) for m, d in final.mean_dice.items()})
        logger.set_tags(tags)
        logger.end("FINISHED")
        if logger.unsent:
            self.unsent_spool = logger.spool.folder
        model_uri = logger.model_uri
        model_id = logged_model_id(model_uri)
        if model_id:
            self.links.model = logged_model_url(self.tracking_uri, self.experiment_id, model_id)
        return model_uri

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


def _cases(entries: dict[str, list]) -> str:
    return ", ".join(f"{len({e.case_id for e in es})} {m.upper()}" for m, es in sorted(entries.items())) + " cases"
