"""The training loop: setup from a validated config, iteration-based training, periodic validation.

Everything hard to get right per step lives in :mod:`medmtl.training.step`; this module wires the
parts (data stream, net, optimizer groups, poly schedule, weighting, precision, tracking) together.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medmtl.config import ExperimentConfig
from medmtl.data.loaders import Split, augment_device, build_training_stream
from medmtl.data.plan import Plan
from medmtl.evaluation.evaluate import Evaluation, evaluate_cases
from medmtl.inference.segmenter import Segmenter
from medmtl.training.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from medmtl.training.distributed import DistributedContext, check_in_sync
from medmtl.training.parts import build_optimizer, build_training_parts
from medmtl.training.precision import resolve_device
from medmtl.training.step import StepResult

__all__ = ["Trainer", "TrainSummary", "seed_everything", "build_optimizer"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainSummary:
    """What a finished run produced."""

    steps: int
    skipped_steps: int
    seconds: float
    final_losses: dict[str, float]
    validation: Evaluation | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    step_seconds: float = math.nan  # median wall time of one step (batch + forward/backward + update) in this process
    val_history: list[dict[str, float]] = field(default_factory=list)  # one row per validation: step, val/*
    best_step: int = 0  # step of best.pt (the best validation score)


class Trainer:
    """Trains a :class:`TwoColumnNet` on unpaired CT and MR batches.

    Args:
        cfg: validated experiment config.
        plan: dataset plan (spacing, intensity statistics).
        split: training and held-out entries per modality.
        data_dir: the ingested dataset folder.
        logger: a :class:`~medmtl.tracking.logger.RunLogger` on rank 0, a :class:`~medmtl.tracking.logger.NullLogger` elsewhere.
        out_dir: where checkpoints go (``last.pt`` every ``train.checkpoint_every`` steps, ``best.pt``).
        dist_ctx: rank and world size (:func:`~medmtl.training.distributed.init_distributed`).
        run_id: the MLflow run id, stored in checkpoints so that a resume continues the same run.
        logged_steps: per metric key, the last step already in the tracking store (a resumed run
            skips those points instead of logging them twice).
        on_validation: called as ``on_validation(step, evaluation)`` after every periodic validation
            (e.g. a sweep reports the score to its pruner; raising there stops training).
    """

    def __init__(self, *, cfg: ExperimentConfig, plan: Plan, split: Split, data_dir: str | Path, logger, out_dir: str | Path,
                 progress: bool = True, dist_ctx: DistributedContext | None = None, run_id: str | None = None,
                 logged_steps: dict[str, int] | None = None, on_validation=None) -> None:
        self.cfg, self.plan, self.split = cfg, plan, split
        self.on_validation = on_validation
        self.data_dir, self.logger, self.out_dir = Path(data_dir), logger, Path(out_dir)
        self.dist = dist_ctx or DistributedContext()
        self.progress = progress and self.dist.is_main
        self.run_id = run_id
        self.logged_steps = dict(logged_steps or {})
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        seed_everything(cfg.seed)  # same initial weights on every rank
        self.parts = build_training_parts(cfg, self.device, self.dist)
        self.net, self.weighting, self.optimizer = self.parts.net, self.parts.weighting, self.parts.optimizer
        self.scheduler, self.precision = self.parts.scheduler, self.parts.precision
        self.stream = build_training_stream(cfg, plan, split, data_dir=self.data_dir, rank=self.dist.rank, world_size=self.dist.world_size,
                                            device=augment_device(cfg) and self.device if self.device.type == "cuda" else None)
        self.step = 0
        self.skipped = 0
        self.best_score = -math.inf
        self.best_step = 0
        self.history: list[dict[str, float]] = []
        self._saved: dict[str, int] = {}  # checkpoint name -> step it holds (for the disk-full message)
        self.val_history: list[dict[str, float]] = []

    # ---------------------------------------------------------------------------------- state
    def _transform_chains(self) -> dict:
        return {m: loader.dataset.transform for m, loader in self.stream.loaders.items()}

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: weights, optimizer, schedule, weighting, scaler,
        sampler positions, random-number states, step, best score and the MLflow run id."""
        return {
            "step": self.step, "skipped": self.skipped, "best_score": self.best_score, "best_step": self.best_step, "run_id": self.run_id,
            "val_history": self.val_history,
            "net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "weighting": self.weighting.state_dict(),
            "scaler": self.precision.scaler.state_dict(), "stream": self.stream.state_dict(),
            "rng": capture_rng(self._transform_chains()),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (from :func:`~medmtl.training.checkpoint.load_checkpoint`)."""
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.weighting.load_state_dict(state["weighting"])
        if state["scaler"]:
            self.precision.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["stream"])
        restore_rng(state["rng"], self._transform_chains())
        self.step, self.skipped, self.best_score = int(state["step"]), int(state["skipped"]), float(state["best_score"])
        self._saved.setdefault("last.pt", self.step)
        self.run_id = state.get("run_id") or self.run_id
        self.best_step = int(state.get("best_step", 0))
        self.val_history = [dict(row) for row in state.get("val_history", [])]  # the validation curves survive a resume

    def save(self, name: str) -> Path | None:
        """Write ``out_dir/name`` atomically (rank 0 only)."""
        if not self.dist.is_main:
            return None
        good = self._saved.get("last.pt")
        path = save_checkpoint(self.out_dir / name, self.state_dict(),
                               last_good=f"step {good} ({self.out_dir / 'last.pt'})" if good is not None else "none yet")
        self._saved[name] = self.step
        return path

    def check_in_sync(self) -> str:
        """Digest of the weights and task weights; under DDP, raises unless identical on every rank."""
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({f"weighting.{k}": v for k, v in self.weighting.state_dict().items() if isinstance(v, torch.Tensor)})
        return check_in_sync(tensors, self.dist, "model and task weights")

    # -------------------------------------------------------------------------------- logging
    def _log(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.logged_steps.get(k, -1)}
        if fresh:
            self.logger.log_metrics(fresh, step=step)

    def _step_metrics(self, r: StepResult) -> dict[str, float]:
        m: dict[str, float] = {f"loss/{t}": v for t, v in r.losses.items()}
        m.update({f"penalty/{k}": v for k, v in r.penalties.items()})
        # optimizer/*: the clipped global norm is not GradNorm's G_i (gradnorm/*), so it is named apart
        m["optimizer/grad_norm"] = r.grad_norm
        m["optimizer/lr"] = self.optimizer.param_groups[0]["lr"]
        m["optimizer/skipped_steps"] = float(self.skipped)
        m.update(self.weighting.log_values())
        m.update(self.net.sharing_log_values())
        return m

    # ----------------------------------------------------------------------------- validation
    def validate(self, entries: dict | None = None) -> Evaluation:
        """Dice per class and loss per modality on the validation cases, or on ``entries`` (original grids), sharded over ranks."""
        seg = Segmenter(self.net, self.cfg, self.plan, device=self.device)
        entries = self.split.val if entries is None else entries
        shard = {m: items[self.dist.rank :: self.dist.world_size] for m, items in entries.items()}
        ev = evaluate_cases(seg, shard, self.data_dir, self.cfg.data.labels, loss=True)
        if self.dist.enabled:
            gathered: list = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, ev.per_case)
            ev = Evaluation.from_per_case([c for part in gathered for c in part], self.cfg.data.labels)
        return ev

    def load_best(self) -> int:
        """Put ``best.pt``'s weights into the net on every rank (rank 0 reads, the others receive); returns its step."""
        path = self.out_dir / "best.pt"
        if self.dist.is_main and path.exists():
            self.net.load_state_dict(load_checkpoint(path)["net"])
        if self.dist.enabled:
            for t in self.net.state_dict().values():
                torch.distributed.broadcast(t, src=0)
        return self.best_step

    def final_scores(self, summary: "TrainSummary") -> tuple[Evaluation, Evaluation | None]:
        """``(validation, test or None)`` of ``best.pt``, which is loaded into the net.

        The test cases were never seen in training or selection; the validation scores chose ``best.pt``, so
        they are only ever reported as validation Dice. A run whose last step is its best reuses that step's
        validation instead of running it again.
        """
        last_is_best = summary.best_step == summary.steps and summary.validation is not None
        self.load_best()
        validation = summary.validation if last_is_best else self.validate()
        test = self.validate(self.split.test) if any(self.split.test.values()) else None
        return validation, test

    @staticmethod
    def score(ev: Evaluation) -> float:
        """Model-selection score: the mean over modalities of the mean Dice over classes."""
        vals = [d["mean"] for d in ev.mean_dice.values() if math.isfinite(d["mean"])]
        return float(np.mean(vals)) if vals else -math.inf

    # ------------------------------------------------------------------------------------ loop
    def train(self) -> TrainSummary:
        """Run until ``train.steps``, validating every ``val_every`` steps and checkpointing every
        ``checkpoint_every`` steps (and ``best.pt`` on a better validation score)."""
        t = self.cfg.train
        started = time.perf_counter()
        ev: Evaluation | None = None
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self.net.train()
        last: StepResult | None = None
        step_times: list[float] = []
        while self.step < t.steps:
            tick = time.perf_counter()
            batch = next(self.stream)
            last = self.parts.step(batch)
            step_times.append(time.perf_counter() - tick)
            self.skipped += 0 if last.applied else 1
            self.scheduler.step()
            self.step += 1
            if self.step % t.log_every == 0 or self.step == t.steps:
                # metrics are built on logging steps only (reading mixing coefficients and weights costs
                # device syncs); the in-memory history (for end-of-run plots) keeps these steps only
                metrics = self._step_metrics(last)
                self.history.append({"step": float(self.step), **metrics})
                self._log(metrics, self.step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({t_: f"{v:.3f}" for t_, v in last.losses.items()})
            if self.step % t.val_every == 0 or self.step == t.steps:
                ev = self.validate()
                self._log(ev.metrics(prefix="val/"), self.step)
                self.val_history.append({"step": float(self.step), **ev.metrics(prefix="val/")})
                if self.score(ev) > self.best_score:
                    self.best_score, self.best_step = self.score(ev), self.step
                    self.save("best.pt")
                if self.on_validation is not None:
                    self.on_validation(self.step, ev)
                self.net.train()
            if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                self.check_in_sync()
                # metrics up to this step are handed over before the checkpoint that claims them
                self.logger.flush()
                self.save("last.pt")
        if bar is not None:
            bar.close()
        self.logger.flush()
        return TrainSummary(
            steps=self.step, skipped_steps=self.skipped, seconds=time.perf_counter() - started,
            final_losses=last.losses if last else {}, validation=ev, history=self.history,
            step_seconds=float(np.median(step_times)) if step_times else math.nan,
            val_history=self.val_history, best_step=self.best_step,
        )
