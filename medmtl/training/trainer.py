"""The training loop: setup from a validated config, iteration-based training, periodic validation.

Everything hard to get right per step lives in :mod:`medmtl.training.step`; this module wires the
parts (data stream, net, optimizer groups, poly schedule, weighting, precision, tracking) together.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss

from medmtl.config import ExperimentConfig
from medmtl.data.loaders import Split, build_training_stream
from medmtl.data.plan import Plan
from medmtl.evaluation.evaluate import Evaluation, evaluate_cases
from medmtl.evaluation.inference import Segmenter
from medmtl.models.two_column import MODALITIES, TwoColumnNet
from medmtl.training.checkpoint import save_checkpoint
from medmtl.training.precision import Precision, resolve_device
from medmtl.training.step import GradientProbe, StepResult, train_step
from medmtl.weighting import build_weighting

__all__ = ["Trainer", "TrainSummary", "seed_everything", "build_optimizer"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(cfg: ExperimentConfig, net: TwoColumnNet, extra_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW or SGD (nesterov) over the net's groups (each mechanism's own lr) plus ``extra_groups``."""
    t = cfg.train
    groups = net.param_groups(t.lr, t.weight_decay) + extra_groups
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay, foreach=True)


@dataclass
class TrainSummary:
    """What a finished run produced."""

    steps: int
    skipped_steps: int
    seconds: float
    final_losses: dict[str, float]
    validation: Evaluation | None = None
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Trains a :class:`TwoColumnNet` on unpaired CT and MR batches.

    Args:
        cfg: validated experiment config.
        plan: dataset plan (spacing, intensity statistics).
        split: training and held-out entries per modality.
        data_dir: the ingested dataset folder.
        logger: a :class:`~medmtl.tracking.logger.RunLogger` or :class:`~medmtl.tracking.logger.NullLogger`.
        out_dir: where checkpoints go.
    """

    def __init__(self, *, cfg: ExperimentConfig, plan: Plan, split: Split, data_dir: str | Path, logger, out_dir: str | Path, progress: bool = True) -> None:
        self.cfg, self.plan, self.split = cfg, plan, split
        self.data_dir, self.logger, self.out_dir = Path(data_dir), logger, Path(out_dir)
        self.progress = progress
        self.device = resolve_device(cfg.train.device)
        self.precision = Precision(cfg.train.precision, self.device)
        seed_everything(cfg.seed)
        self.net = TwoColumnNet(cfg=cfg).to(self.device)
        self.weighting = build_weighting(cfg.weighting, MODALITIES).to(self.device)
        self.optimizer = build_optimizer(cfg, self.net, self.weighting.param_groups())
        steps, power = cfg.train.steps, cfg.train.poly_power
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: max(0.0, 1.0 - s / steps) ** power)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5)
        self.probe = GradientProbe(self.net.depth_parameters(cfg.weighting.depth)) if self.weighting.needs_grad_norms else None
        self.stream = build_training_stream(cfg, plan, split, data_dir=self.data_dir)
        self.step = 0
        self.skipped = 0

    def state_dict(self) -> dict:
        """Everything needed to resume: weights, optimizer, schedule, weighting, scaler, sampler positions."""
        return {
            "step": self.step, "skipped": self.skipped, "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "weighting": self.weighting.state_dict(), "scaler": self.precision.scaler.state_dict(),
            "stream": self.stream.state_dict(),
        }

    def _log_step(self, r: StepResult) -> dict[str, float]:
        m: dict[str, float] = {f"loss/{t}": v for t, v in r.losses.items()}
        m.update({f"penalty/{k}": v for k, v in r.penalties.items()})
        m["grad_norm"] = r.grad_norm
        m["lr"] = self.optimizer.param_groups[0]["lr"]
        m["skipped_steps"] = float(self.skipped)
        m.update(self.weighting.log_values())
        m.update(self.net.sharing_log_values())
        return m

    def validate(self) -> Evaluation:
        """Dice per class per modality on the held-out cases (original grids)."""
        seg = Segmenter(self.net, self.cfg, self.plan, device=self.device)
        return evaluate_cases(seg, self.split.val, self.data_dir, self.cfg.data.labels)

    def train(self) -> TrainSummary:
        """Run ``train.steps`` steps, validating every ``train.val_every`` steps and at the end."""
        t = self.cfg.train
        history: list[dict[str, float]] = []
        started = time.perf_counter()
        ev: Evaluation | None = None
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self.net.train()
        last: StepResult | None = None
        while self.step < t.steps:
            batch = next(self.stream)
            last = train_step(
                net=self.net, batch=batch, loss_fn=self.loss_fn, weighting=self.weighting, optimizer=self.optimizer,
                precision=self.precision, grad_clip=t.grad_clip, probe=self.probe, device=self.device,
            )
            self.skipped += 0 if last.applied else 1
            self.scheduler.step()
            self.step += 1
            metrics = self._log_step(last)
            history.append(metrics)
            if self.step % t.log_every == 0 or self.step == t.steps:
                self.logger.log_metrics(metrics, step=self.step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items() if k.startswith("loss/")})
            if self.step % t.val_every == 0 or self.step == t.steps:
                ev = self.validate()
                self.logger.log_metrics(ev.metrics(prefix="val/"), step=self.step)
                self.net.train()
        if bar is not None:
            bar.close()
        save_checkpoint(self.out_dir / "last.pt", self.state_dict())
        self.logger.flush()
        return TrainSummary(
            steps=self.step, skipped_steps=self.skipped, seconds=time.perf_counter() - started,
            final_losses=last.losses if last else {}, validation=ev, history=history,
        )
