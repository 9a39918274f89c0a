"""The interface every loss-weighting method implements.

Per step the trainer asks :meth:`LossWeighting.task_terms` for each task's term to back-propagate
(the CT and MR losses come from disjoint forward graphs and are back-propagated one after the
other), reads the per-task gradient norms on ``W`` between the two backward passes when the method
asks for them (:attr:`needs_grad_norms`), and calls :meth:`after_step` once the optimizer step is
known to be applied or skipped. State lives in buffers and parameters, so ``state_dict`` round-trips.

Before forwarding anything, the step asks :meth:`LossWeighting.select_tasks` which tasks take part
(all by default); a method may drop a task for a step (DST), and that task is then not forwarded at
all, so its compute is saved. ``task_terms`` and ``after_step`` only see the forwarded tasks.

Rank independence: a method's state must depend only on its config and on the numbers the step hands
it (losses averaged over ranks, norms of all-reduced gradients), never on the rank or on a global RNG,
so that every rank holds bit-identical weights.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

__all__ = ["LossWeighting"]


class LossWeighting(nn.Module):
    """Base class: fixed weights in the buffer ``weights`` (one per task, in ``tasks`` order)."""

    #: True when :meth:`after_step` needs ``G_i = ||grad_W (w_i L_i)||`` for every task
    needs_grad_norms: ClassVar[bool] = False

    def __init__(self, *, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.register_buffer("weights", torch.ones(len(tasks)))

    def select_tasks(self, available: tuple[str, ...]) -> tuple[str, ...]:
        """Tasks to forward this step (called once per step, before any forward); all of them by default."""
        return tuple(available)

    def task_terms(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weighted term of each task, ``w_i * L_i`` (the weights are constants for the network)."""
        return {t: self.weights[i].detach() * losses[t] for i, t in enumerate(self.tasks) if t in losses}

    def after_step(self, losses: dict[str, float], grad_norms: dict[str, float] | None, *, applied: bool) -> None:
        """Update internal state from this step's unweighted losses of the forwarded tasks.

        ``grad_norms`` holds ``G_i`` when :attr:`needs_grad_norms` (else None); ``applied=False`` for a
        skipped step (non-finite gradients), after which no method may change its weights.
        """

    def log_values(self) -> dict[str, float]:
        """Current weights (and method internals) for tracking."""
        return {f"weight/{t}": float(self.weights[i]) for i, t in enumerate(self.tasks)}

    def param_groups(self) -> list[dict]:
        """Parameters the network optimizer must train (e.g. uncertainty log-variances); none by default."""
        return []
