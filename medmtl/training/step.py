"""One optimizer step of joint CT+MR training, with the hard parts in one place.

Order: for each task the weighting method selects (all, unless it drops one for this step), forward
its batch and back-propagate its weighted term ``w_i L_i`` plus the auxiliary losses of that forward pass
(a router's balance loss; a task with nothing trainable on its path, as in adaptation, is forwarded for
its loss only). The two graphs are disjoint, so each task's gradient is the growth of ``.grad`` between
the backward passes, read at no extra backward: its norm on GradNorm's ``W`` by :class:`GradientProbe`,
the whole gradient on the shared parameters by :class:`TaskGradients`. Then average the gradients over ranks; let the weighting method combine the tasks'
gradients on the shared parameters (:meth:`~medmtl.weighting.base.LossWeighting.adjust_gradients`, only
for methods that declare it); back-propagate the sharing penalties; unscale (fp16); skip the step if any
gradient is non-finite; clip; step; then let the weighting method update from the measured norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from medmtl.models.deep_supervision import deep_supervision_loss
from medmtl.training.distributed import DistributedContext, all_reduce_mean, average_gradients
from medmtl.training.precision import Precision
from medmtl.weighting.base import LossWeighting

__all__ = ["StepResult", "GradientProbe", "TaskGradients", "train_step"]


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

    def __init__(self, params: list[nn.Parameter], ctx: DistributedContext | None = None) -> None:
        self.params = params
        self.ctx = ctx or DistributedContext()
        self._prev: list[torch.Tensor] | None = None

    def reset(self) -> None:
        """Forget the previous snapshot (call after ``zero_grad``)."""
        self._prev = None

    def read(self, scale: float) -> float:
        """Norm of the gradient added to ``W`` since the last read, divided by the loss scale.

        Under data parallelism the task's gradient on ``W`` is averaged over ranks first (a small
        all-reduce of ``W``'s size), so the norm is that of the all-reduced gradient on every rank.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        delta = grads if self._prev is None else torch._foreach_sub(grads, self._prev)
        self._prev = [g.detach().clone() for g in grads]
        if scale != 1.0:
            # unscale before the norm: with a large loss scale the sum of squares of finite scaled
            # gradients overflows fp32 although the gradients themselves do not
            delta, scale = torch._foreach_div(delta, scale), 1.0
        if self.ctx.enabled:
            flat = all_reduce_mean(torch.cat([d.reshape(-1) for d in delta]), self.ctx)
            return float(torch.linalg.vector_norm(flat)) / scale
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(delta)))) / scale


class TaskGradients:
    """Each task's gradient on a fixed parameter list (the shared parameters), for ``adjust_gradients``.

    Task ``k``'s gradient is the growth of ``.grad`` during its backward pass: the step calls
    :meth:`record` after every task's backward but the last (one copy of the parameters' gradients per
    such task, one in all for two tasks), then :meth:`collect` after the gradients were averaged over
    ranks: the recorded snapshots are averaged over ranks in one all-reduce of a flat buffer, so every
    task's gradient is the rank average (identical on every rank), and the loss scale is divided out.
    :meth:`write` puts the combined gradient back, scaled again, so penalties, unscaling and clipping
    follow as in every other step.
    """

    def __init__(self, params: list[nn.Parameter], ctx: DistributedContext | None = None) -> None:
        self.params = list(params)
        self.ctx = ctx or DistributedContext()
        self._snapshots: list[list[torch.Tensor]] = []

    def reset(self) -> None:
        """Forget the snapshots of the previous step (call after ``zero_grad``)."""
        self._snapshots = []

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def record(self) -> None:
        """Snapshot the accumulated (local, loss-scaled) gradients after a task's backward pass."""
        self._snapshots.append([g.detach().clone() for g in self._grads()])

    def collect(self, tasks: tuple[str, ...] | list[str], scale: float) -> dict[str, list[torch.Tensor]]:
        """Task -> its gradient on every parameter, unscaled and rank-averaged (``record`` was called for
        every task but the last, and ``.grad`` now holds the rank-averaged sum)."""
        if len(self._snapshots) != len(tasks) - 1:
            raise RuntimeError(f"TaskGradients: {len(self._snapshots)} snapshots for {len(tasks)} tasks; "
                               "call record() after each task's backward but the last")
        snaps = self._snapshots
        if self.ctx.enabled and snaps:
            flat = torch.cat([g.reshape(-1) for snap in snaps for g in snap])
            flat = all_reduce_mean(flat, self.ctx)
            out, i = [], 0
            for snap in snaps:
                row = []
                for g in snap:
                    row.append(flat[i : i + g.numel()].view_as(g))
                    i += g.numel()
                out.append(row)
            snaps = out
        cumulative = snaps + [[g.detach() for g in self._grads()]]
        # the first task's gradient is its snapshot itself (a copy already), unless it is the only task
        deltas = [cumulative[0] if snaps else [g.clone() for g in cumulative[0]]]
        deltas += [torch._foreach_sub(cum, prev) for prev, cum in zip(cumulative, cumulative[1:])]
        if scale != 1.0:
            for delta in deltas:  # after every subtraction: the snapshots are the subtrahends
                torch._foreach_div_(delta, scale)
        self._snapshots = []
        return dict(zip(tasks, deltas))

    def write(self, combined: list[torch.Tensor], scale: float) -> None:
        """Replace ``.grad`` of every parameter by ``combined`` (unscaled) times the loss ``scale``."""
        if len(combined) != len(self.params):
            raise ValueError(f"adjust_gradients returned {len(combined)} tensors for {len(self.params)} shared parameters")
        for p, c in zip(self.params, combined):
            value = c.detach().to(p.dtype) * scale if scale != 1.0 else c.detach().to(p.dtype)
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)


def _unique_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


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
    task_gradients: TaskGradients | None = None,
    device: torch.device,
    dist_ctx: DistributedContext | None = None,
) -> StepResult:
    """Run one step on ``{"ct": {"image", "label"}, "mr": {...}}`` and return what happened.

    ``probe`` reads per-task gradient norms for the weighting's ``after_step``; ``task_gradients`` (on the
    shared parameters) feeds its ``adjust_gradients``. Both come from
    :func:`~medmtl.training.parts.build_training_parts`, which builds them only for methods that need them.
    """
    optimizer.zero_grad(set_to_none=True)
    if probe is not None:
        probe.reset()
    if task_gradients is not None:
        task_gradients.reset()
    scaler = precision.scaler
    losses: dict[str, float] = {}
    norms: dict[str, float] = {}
    # a method may drop a task for this step (DST); a dropped task is not forwarded at all
    aux = hasattr(net, "forward_with_aux")  # any module with forward(x, task) trains; TwoColumnNet adds aux heads
    tasks = weighting.select_tasks(tuple(batch))
    for k, task in enumerate(tasks):
        b = batch[task]
        x = b["image"].to(device, non_blocking=True)
        y = b["label"].to(device, non_blocking=True)
        with precision.autocast():
            outputs = net.forward_with_aux(x, task) if aux else {"main": net(x, task)}
        # main logits plus any deep-supervision heads (exactly loss_fn(logits, y) without them)
        loss = deep_supervision_loss(loss_fn, outputs, y, net.deep_supervision_weights if aux else {"main": 1.0})
        term = weighting.task_terms({task: loss})[task]
        # auxiliary losses of this forward pass (a router's balance loss), unweighted by the task weight
        extra = net.forward_losses() if hasattr(net, "forward_losses") else {}
        if extra:
            term = term + torch.stack(list(extra.values())).sum()
        # a task whose path has nothing to train (adaptation of the other modality) is forwarded for its loss only
        if term.requires_grad:
            scaler.scale(term).backward()
        losses[task] = float(loss.detach())
        if probe is not None:
            norms[task] = probe.read(precision.loss_scale)
        if task_gradients is not None and k < len(tasks) - 1:
            task_gradients.record()
    ctx = dist_ctx or DistributedContext()
    params = _unique_params(optimizer)
    # one all-reduce per step, after both tasks; penalties need none (parameters are identical on all ranks)
    average_gradients(params, ctx)
    if ctx.enabled:
        # every rank feeds the weighting method the same (rank-averaged) losses -> identical task weights
        mean = all_reduce_mean(torch.tensor([losses[t] for t in losses], dtype=torch.float64), ctx)
        losses = {t: float(v) for t, v in zip(losses, mean)}
    if task_gradients is not None and task_gradients.params and tasks:
        # after averaging, before the penalties: the method sees (and replaces) only the tasks' gradients
        combined = weighting.adjust_gradients(task_gradients.collect(tasks, precision.loss_scale))
        if combined is not None:
            task_gradients.write(combined, precision.loss_scale)
    penalties = net.penalties()
    if penalties:
        scaler.scale(torch.stack(list(penalties.values())).sum()).backward()
    scaler.unscale_(optimizer)
    params = [p for p in params if p.grad is not None]
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
