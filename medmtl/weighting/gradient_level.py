"""Shared machinery of the gradient-level methods (MetaBalance, PCGrad, CAGrad).

These methods keep every loss weight at 1 and instead combine the tasks' gradients on the shared
parameters in :meth:`~medmtl.weighting.base.LossWeighting.adjust_gradients`. The step hands each task's
gradient per shared parameter (unscaled, rank-averaged); :class:`GradientCombination` flattens them into
one ``(T, N)`` matrix, reads the Gram matrix ``G_ij = g_i . g_j`` (float64 on the CPU: the algebra of the
methods is on ``T x T`` numbers) and lets the method return the combined gradient.

Scaling: what the hook returns replaces the *sum* of the task gradients, which is what equal weighting
applies (``sum_i L_i``). Each method is therefore written at sum scale: PCGrad returns ``sum_i g_i^PC``
(as published), CAGrad ``T * d`` (``d`` its update around the *average* gradient, so that ``c = 0`` is
exactly equal weighting), MetaBalance ``g_main + sum_aux g_aux'`` (as published). The learning rate means
the same as with every other method.

Tracking (``log_values``): per-task gradient norms on the shared parameters, the cosine between every
pair of tasks' gradients, the effective coefficient on each task's gradient, and the fraction of applied
steps whose gradients conflicted (``g_i . g_j < 0`` for some pair), counted in buffers so it resumes.

Skipped steps: a non-finite gradient makes the method return None (the sum, non-finite, makes the
step skip) and nothing it measured is committed; state changes only in ``after_step(applied=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from medmtl.weighting.base import LossWeighting

__all__ = ["Combination", "GradientCombination", "split_like"]


@dataclass
class Combination:
    """What a method's :meth:`GradientCombination.combine` returns.

    ``grads``: the combined gradient, one tensor per shared parameter (sum scale); ``coefficients``: each
    task's effective coefficient on its gradient (a mean over parameters where it varies), for tracking;
    ``extra``: more metrics, by full name; ``state``: tentative state for :meth:`GradientCombination.commit`.
    """

    grads: list[torch.Tensor]
    coefficients: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)
    state: dict | None = None


def split_like(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of the flat vector ``flat`` (``(N,)``) shaped like the tensors of ``like`` (in order)."""
    out, i = [], 0
    for g in like:
        out.append(flat[i : i + g.numel()].view_as(g))
        i += g.numel()
    return out


class GradientCombination(LossWeighting):
    """Base of the methods that combine per-task gradients on the shared parameters (weights stay 1).

    A subclass implements :meth:`combine`, which may return tentative state; :meth:`commit` applies that
    state once the step is known to be applied (a skipped step discards it).
    """

    def __init__(self, *, cfg, tasks: tuple[str, ...]) -> None:
        super().__init__(cfg=cfg, tasks=tasks)
        self.register_buffer("observed_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("conflict_steps", torch.zeros((), dtype=torch.long))
        self._pending: dict | None = None
        self.last: dict[str, float] = {}

    def combine(self, tasks: list[str], flat: torch.Tensor, gram: torch.Tensor,
                grads: list[list[torch.Tensor]]) -> Combination:
        """The combined gradient of the tasks ``tasks`` (see :class:`Combination`).

        ``flat`` is ``(T, N)`` (task ``k``'s gradient on all shared parameters, float32, on the device),
        ``gram`` the ``(T, T)`` float64 CPU matrix ``flat @ flat.T``, ``grads`` the per-parameter tensors.
        """
        raise NotImplementedError

    def commit(self, state: dict) -> None:
        """Apply the tentative state :meth:`combine` returned, for an applied step (nothing by default)."""

    def adjust_gradients(self, task_grads: dict[str, list[torch.Tensor]]) -> list[torch.Tensor] | None:
        """Record norms, cosines and conflict of this step's task gradients, then :meth:`combine` them."""
        self._pending = None
        tasks = [t for t in self.tasks if t in task_grads]
        if len(tasks) < 2:
            return None  # one task: nothing to combine (the sum is that task's gradient)
        grads = [task_grads[t] for t in tasks]
        like = grads[0][0]
        flat = torch.empty(len(tasks), sum(g.numel() for g in grads[0]), dtype=like.dtype, device=like.device)
        for row, gs in zip(flat, grads):  # one copy of each task's gradient, straight into its row
            torch.cat([g.reshape(-1) for g in gs], out=row)
        gram = (flat @ flat.T).double().cpu()
        if not bool(torch.isfinite(gram).all()):
            return None  # the step is skipped for non-finite gradients; measure nothing
        norms = gram.diagonal().clamp_min(0).sqrt()
        conflict = False
        stats: dict[str, float] = {f"gradients/norm/{t}": float(norms[k]) for k, t in enumerate(tasks)}
        for i in range(len(tasks)):
            for j in range(i + 1, len(tasks)):
                denom = float(norms[i] * norms[j])
                stats[f"gradients/cosine/{tasks[i]}_{tasks[j]}"] = float(gram[i, j]) / denom if denom > 0 else 0.0
                conflict |= bool(gram[i, j] < 0)
        result = self.combine(tasks, flat, gram, grads)
        stats.update({f"gradients/coefficient/{t}": v for t, v in result.coefficients.items()})
        stats.update(result.extra)
        self._pending = {"conflict": conflict, "stats": stats, "method": result.state}
        return result.grads

    def after_step(self, losses: dict[str, float], grad_norms: dict[str, float] | None, *, applied: bool) -> None:
        """Commit this step's measurements and the method's state, for an applied step only."""
        pending, self._pending = self._pending, None
        if not applied or pending is None:
            return
        self.observed_steps += 1
        self.conflict_steps += int(pending["conflict"])
        self.last = pending["stats"]
        if pending["method"] is not None:
            self.commit(pending["method"])

    def log_values(self) -> dict[str, float]:
        """Weights (1), the last applied step's norms, cosines and coefficients, and the conflict fraction."""
        out = super().log_values()
        out.update(self.last)
        seen = int(self.observed_steps)
        out["gradients/conflict_fraction"] = int(self.conflict_steps) / seen if seen else 0.0
        return out
