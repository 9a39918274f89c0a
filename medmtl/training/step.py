"""One optimizer step of joint CT+MR training, with the hard parts in one place.

Order: for each task, forward its batch and back-propagate its weighted term ``w_i L_i`` (the two
graphs are disjoint, so each task's gradient on GradNorm's ``W`` is read between the two backward
passes at no extra cost); back-propagate the sharing penalties; unscale (fp16); skip the step if any
gradient is non-finite; clip; step; then let the weighting method update from the measured norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from medmtl.training.precision import Precision
from medmtl.weighting.base import LossWeighting

__all__ = ["StepResult", "GradientProbe", "train_step"]


@dataclass
class StepResult:
    """What one step did: unweighted task losses, penalties, total norm, whether it was applied."""

    losses: dict[str, float]
    penalties: dict[str, float]
    grad_norm: float
    applied: bool
    task_grad_norms: dict[str, float] = field(default_factory=dict)


class GradientProbe:
    """Reads ``||grad_W (w_i L_i)||`` for each task from the gradient accumulated between backward passes."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self._prev: list[torch.Tensor] | None = None

    def reset(self) -> None:
        """Forget the previous snapshot (call after ``zero_grad``)."""
        self._prev = None

    def read(self, scale: float) -> float:
        """Norm of the gradient added to ``W`` since the last read, divided by the loss scale."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        delta = grads if self._prev is None else torch._foreach_sub(grads, self._prev)
        self._prev = [g.detach().clone() for g in grads]
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(delta)))) / scale


def train_step(
    *,
    net: nn.Module,
    batch: dict[str, dict[str, torch.Tensor]],
    loss_fn: nn.Module,
    weighting: LossWeighting,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    grad_clip: float | None,
    probe: GradientProbe | None = None,
    device: torch.device,
) -> StepResult:
    """Run one step on ``{"ct": {"image", "label"}, "mr": {...}}`` and return what happened."""
    optimizer.zero_grad(set_to_none=True)
    if probe is not None:
        probe.reset()
    scaler = precision.scaler
    losses: dict[str, float] = {}
    norms: dict[str, float] = {}
    for task, b in batch.items():
        x = b["image"].to(device, non_blocking=True)
        y = b["label"].to(device, non_blocking=True)
        with precision.autocast():
            logits = net(x, task)
        loss = loss_fn(logits.float(), y)
        term = weighting.task_terms({task: loss})[task]
        scaler.scale(term).backward()
        losses[task] = float(loss.detach())
        if probe is not None:
            norms[task] = probe.read(precision.loss_scale)
    penalties = net.penalties()
    if penalties:
        scaler.scale(torch.stack(list(penalties.values())).sum()).backward()
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    total = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else math.inf, foreach=True)
    finite = bool(torch.isfinite(total))
    if scaler.is_enabled():
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skips internally when inf/nan were found while unscaling
        scaler.update()
        applied = finite and scaler.get_scale() >= scale_before
    else:
        applied = finite
        if applied:
            optimizer.step()
    if not applied:
        optimizer.zero_grad(set_to_none=True)
    weighting.after_step(losses, norms if probe is not None else None, applied=applied)
    return StepResult(
        losses=losses, penalties={k: float(v.detach()) for k, v in penalties.items()},
        grad_norm=float(total), applied=applied, task_grad_norms=norms,
    )
