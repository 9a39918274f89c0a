"""Train one experiment and track it in MLflow: plan -> run -> train -> held-out evaluation -> model."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from medmtl.config import ExperimentConfig
from medmtl.data.checks import check_dataset
from medmtl.data.loaders import load_split
from medmtl.data.manifest import read_manifest
from medmtl.data.plan import ensure_plan, load_plan, resolve_plan
from medmtl.tracking.links import Links
from medmtl.tracking.run import TrackedRun
from medmtl.training.checkpoint import check_writable_dir, load_checkpoint
from medmtl.training.distributed import init_distributed
from medmtl.training.precision import resolve_device
from medmtl.training.trainer import Trainer


@dataclass
class TrainResult:
    """Identifiers, final scores of ``best.pt`` and UI links of a finished run.

    ``test_dice`` is empty without a test split; ``val_dice`` is ``best.pt`` on the validation cases.
    """

    run_id: str
    tracking_uri: str
    model_uri: str | None
    test_dice: dict[str, dict[str, float]]
    unsent_spool: str | None = None  # the tracking server was down at the end: `medmtl sync` this folder
    val_dice: dict[str, dict[str, float]] = field(default_factory=dict)
    best_step: int = 0
    links: Links = field(default_factory=Links)

    def summary(self) -> str:
        """Lines for the terminal: run id, Dice per organ (test, else validation, said so), the run's pages."""
        dice, what = (self.test_dice, "test Dice") if self.test_dice else (self.val_dice, "validation Dice (no test set)")
        lines = [f"run id: {self.run_id}", f"{what} of best.pt (step {self.best_step}):"]
        lines += [f"  {m.upper()}: " + "  ".join(f"{k} {v:.3f}" for k, v in d.items()) for m, d in dice.items()]
        return "\n".join(lines + [self.links.text()])


def run_training(cfg: ExperimentConfig, *, out_dir: str | Path = "runs", progress: bool = True,
                 resume: str | Path | None = None, tags: dict[str, str] | None = None, on_validation=None) -> TrainResult:
    """Train ``cfg`` end to end and return the MLflow run id and held-out Dice.

    Under ``torchrun`` every rank trains on its shard; only rank 0 talks to MLflow and writes
    checkpoints. ``resume`` (a ``last.pt``) continues the same MLflow run without duplicated steps.
    ``tags`` go on a new run (a study's cell: its parent run and cell key); ``on_validation(step, evaluation)``
    is called after each periodic validation (a sweep's pruner).
    """
    ctx = init_distributed(resolve_device(cfg.train.device).type)
    data_dir, split = load_split(cfg)
    # everything a user can get wrong is checked before the MLflow run exists (no run left behind)
    check_dataset(data_dir, read_manifest(data_dir), cfg.data.labels)
    if ctx.is_main:
        check_writable_dir(Path(resume).parent if resume is not None else out_dir)
    plan_path = ensure_plan(data_dir, cfg)
    # the plan as this run uses it (config overrides applied): trained, logged and shipped with the model
    plan = resolve_plan(load_plan(plan_path), cfg)
    state = load_checkpoint(resume) if resume is not None else None
    run = TrackedRun.open(cfg, ctx=ctx, data_dir=data_dir, split=split, plan=plan, plan_path=plan_path, out_dir=Path(out_dir),
                          resume_state=state, resume_path=Path(resume) if resume is not None else None, tags=tags)
    # a resumed run keeps writing beside the checkpoint it came from; only rank 0 writes at all
    ckpt_dir = Path(resume).parent if resume is not None else run.checkpoint_dir or Path(out_dir)
    try:
        trainer = Trainer(cfg=cfg, plan=plan, split=split, data_dir=data_dir, logger=run.logger, out_dir=ckpt_dir,
                          progress=progress, dist_ctx=ctx,
                          run_id=run.run_id, logged_steps=run.logged_steps, on_validation=on_validation)
        if state is not None:
            trainer.load_state_dict(state)
        summary = trainer.train()
        validation, test = trainer.final_scores(summary)  # the model is best.pt; test scores only from a test split
        model_uri = run.finish(trainer=trainer, summary=summary, test=test, validation=validation, plan=plan, split=split,
                               data_dir=data_dir)
    except BaseException:
        run.fail(sys.exc_info()[1])
        raise
    return TrainResult(run_id=run.run_id or "", tracking_uri=run.tracking_uri, model_uri=model_uri,
                       test_dice=test.mean_dice if test is not None else {}, val_dice=validation.mean_dice,
                       best_step=summary.best_step, links=run.links,
                       unsent_spool=str(run.unsent_spool) if run.unsent_spool else None)
