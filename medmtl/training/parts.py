"""One way to build what a training step needs, used by the trainer and by every benchmark.

:func:`build_training_parts` turns a validated config into the network, the weighting method, the
optimizer and its poly schedule, the loss, the precision policy, and the gradient readers the weighting
method declares it needs (a :class:`~medmtl.training.step.GradientProbe` on its probe depth, a
:class:`~medmtl.training.step.TaskGradients` on the shared parameters). Benchmarks that time a step
build it here too, so they time exactly what training runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss
from torch import nn

from medmtl.config import ExperimentConfig, LossConfig
from medmtl.errors import ConfigError
from medmtl.modality import MODALITIES
from medmtl.models.two_column import TwoColumnNet
from medmtl.training.distributed import DistributedContext
from medmtl.training.precision import Precision, PrecisionMode
from medmtl.training.step import GradientProbe, StepResult, TaskGradients, train_step
from medmtl.weighting import LossWeighting, build_weighting

__all__ = ["TrainingParts", "build_training_parts", "build_loss", "build_optimizer"]


def build_loss(cfg: LossConfig) -> nn.Module:
    """The segmentation loss of the ``loss`` section, called as ``loss(logits (B, 1 + n, ...), labels (B, 1, ...))``."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=cfg.include_background, squared_pred=cfg.squared_pred,
                      batch=cfg.batch, smooth_nr=cfg.smooth_nr, smooth_dr=cfg.smooth_dr, lambda_dice=cfg.lambda_dice,
                      lambda_ce=cfg.lambda_ce)


def build_optimizer(cfg: ExperimentConfig, net: TwoColumnNet, extra_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW or SGD (nesterov) over the net's groups (each mechanism's own lr) plus ``extra_groups``."""
    t = cfg.train
    groups = net.param_groups(t.lr, t.weight_decay) + extra_groups
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay, foreach=True)


@dataclass
class TrainingParts:
    """Everything one training step uses, built from one config (see :func:`build_training_parts`)."""

    cfg: ExperimentConfig
    device: torch.device
    net: TwoColumnNet
    weighting: LossWeighting
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: nn.Module
    precision: Precision
    probe: GradientProbe | None
    task_gradients: TaskGradients | None
    dist_ctx: DistributedContext

    def step(self, batch: dict[str, dict[str, torch.Tensor]]) -> StepResult:
        """One :func:`~medmtl.training.step.train_step` on ``batch`` with these parts (the schedule is not advanced)."""
        return train_step(
            net=self.net, batch=batch, loss_fn=self.loss_fn, weighting=self.weighting, optimizer=self.optimizer,
            precision=self.precision, grad_clip=self.cfg.train.grad_clip, probe=self.probe,
            task_gradients=self.task_gradients, device=self.device, dist_ctx=self.dist_ctx,
        )


def build_training_parts(cfg: ExperimentConfig, device: torch.device, dist_ctx: DistributedContext | None = None,
                         *, precision: PrecisionMode | None = None) -> TrainingParts:
    """Build the network (on ``device``), weighting, optimizer, poly schedule, loss, precision and gradient readers.

    Seeding is the caller's: the net's initial weights come from torch's global RNG as it stands
    (the trainer seeds everything first, so every rank builds the same net). ``precision`` overrides
    ``train.precision`` (the precision benchmark compares modes on one config). ``train.compile`` compiles
    the network's forward in place (``nn.Module.compile``), so checkpoints and gradient readers are unchanged.
    """
    ctx = dist_ctx or DistributedContext()
    prec = Precision(precision or cfg.train.precision, device)
    net = TwoColumnNet(cfg=cfg).to(device)
    if cfg.train.compile:
        net.compile()  # in place: parameters, state_dict keys and hooks stay those of `net`
    weighting = build_weighting(cfg.weighting, MODALITIES).to(device)
    optimizer = build_optimizer(cfg, net, weighting.param_groups())
    steps, power = cfg.train.steps, cfg.train.poly_power
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / steps) ** power)
    loss_fn = build_loss(cfg.loss)
    probe = GradientProbe(net.depth_parameters(weighting.probe_depth), ctx) if weighting.probe_depth is not None else None
    task_gradients = None
    if weighting.gradient_parameters == "shared":
        shared = net.shared_parameters()
        if not shared:  # the config refuses this; a hand-built config or a frozen network can still get here
            raise ConfigError(f"weighting.method: {cfg.weighting.method} needs parameters both tasks put gradient on; "
                             "this network has none (independent columns, or the shared ones are frozen)")
        task_gradients = TaskGradients(shared, ctx)
    return TrainingParts(cfg=cfg, device=device, net=net, weighting=weighting, optimizer=optimizer, scheduler=scheduler,
                         loss_fn=loss_fn, precision=prec, probe=probe, task_gradients=task_gradients, dist_ctx=ctx)
