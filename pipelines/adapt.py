"""Adapt a trained model to a modality with LoRA adapters only: source -> frozen base -> tracked run -> merged model.

``source`` is a run id, a checkpoint or a ``models:/`` / ``runs:/`` URI. The source modality's column and
head become the frozen shared base; only the target modality's low-rank deltas train, on the target's
cases of ``cfg.data.root`` (the source's dataset, or ``data_root``: a new site's or scanner's data). The run
is tracked like any training run, with the trainable-parameter share logged; the logged (and, with
``register``, registered) model has the deltas merged into the target's kernels.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from medmtl.data.loaders import load_split
from medmtl.data.plan import save_plan
from medmtl.tracking.registry import register_run_model
from medmtl.tracking.run import TrackedRun
from medmtl.tracking.source import load_source_model
from medmtl.tracking.store import resolve_tracking_uri
from medmtl.training.adapt import adaptation_config, load_base, trainable_share
from medmtl.training.distributed import DistributedContext
from medmtl.training.trainer import Trainer


@dataclass
class AdaptResult:
    """The adaptation run, its model (merged), the registered version if any, and Dice of best.pt.

    ``test_dice`` is empty without a test split; ``val_dice`` is on the validation cases (which chose best.pt).
    """

    run_id: str
    tracking_uri: str
    model_uri: str | None
    registered: str | None
    trainable: dict[str, float]
    test_dice: dict[str, dict[str, float]]
    val_dice: dict[str, dict[str, float]]


def run_adaptation(source: str, *, target: str = "mr", source_modality: str = "ct", data_root: str | None = None,
                   lora: dict | None = None, overrides: list[str] | None = None, out_dir: str | Path = "runs",
                   register: bool = True, progress: bool = True) -> AdaptResult:
    """Train ``target``'s LoRA adapters on top of ``source``'s ``source_modality`` model and log the merged result."""
    uri, _ = resolve_tracking_uri(None)
    src = load_source_model(source, tracking_uri=uri)
    cfg = adaptation_config(src.cfg, target=target, source=source_modality, data_root=data_root, lora=lora, overrides=overrides)
    data_dir, split = load_split(cfg)
    # the source's plan, unchanged: the adapted model preprocesses both modalities exactly as the source did
    plan = src.plan
    plan_path = save_plan(plan, Path(out_dir) / "adapt_plans" / f"{cfg.name}.plan.json")
    ctx = DistributedContext()
    run = TrackedRun.open(cfg, ctx=ctx, data_dir=data_dir, split=split, plan=plan, plan_path=plan_path, out_dir=Path(out_dir))
    try:
        trainer = Trainer(cfg=cfg, plan=plan, split=split, data_dir=data_dir, logger=run.logger,
                          out_dir=run.checkpoint_dir or Path(out_dir), progress=progress, dist_ctx=ctx, run_id=run.run_id)
        load_base(trainer.net, src.state, source_modality)
        share = trainable_share(trainer.net)
        run.logger.set_tags({"medmtl.adapted_from": src.source, "medmtl.adapted_from_run": src.run_id or "",
                             "medmtl.adapt": f"{source_modality}->{target}"})
        run.logger.log_metrics(share, step=0)
        summary = trainer.train()
        validation, test = trainer.final_scores(summary)  # the model is best.pt; test scores only from a test split
        model_uri = run.finish(trainer=trainer, summary=summary, test=test, validation=validation, plan=plan, split=split,
                               data_dir=data_dir)
    except BaseException:
        run.fail(sys.exc_info()[1])
        raise
    registered = None
    if register and model_uri is not None:
        version = register_run_model(tracking_uri=run.tracking_uri, run_id=run.run_id or "", name=cfg.tracking.registered_model,
                                     model_uri=model_uri)
        registered = f"models:/{version.name}/{version.version}"
    return AdaptResult(run_id=run.run_id or "", tracking_uri=run.tracking_uri, model_uri=model_uri, registered=registered,
                       trainable=share, test_dice=test.mean_dice if test is not None else {}, val_dice=validation.mean_dice)
