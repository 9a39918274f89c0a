"""The interface every loss-weighting method implements.

Per step the trainer asks :meth:`LossWeighting.task_terms` for each task's term to back-propagate
(the CT and MR losses come from disjoint forward graphs and are back-propagated one after the
other), and calls :meth:`after_step` once the optimizer step is known to be applied or skipped.
State lives in buffers and parameters, so ``state_dict`` round-trips.

Before forwarding anything, the step asks :meth:`LossWeighting.select_tasks` which tasks take part
(all by default); a method may drop a task for a step (DST), and that task is then not forwarded at
all, so its compute is saved. ``task_terms``, ``adjust_gradients`` and ``after_step`` only see the
forwarded tasks.

What a method needs from the step is declared on its config class (``_WeightingBase`` in
:mod:`medmtl.config`), checked when the config is validated, and read here through ``self.cfg``:

* ``probe_depth``: the step reads ``G_i = ||grad_W (w_i L_i)||`` on the parameters ``W`` of that depth
  between the two backward passes and hands the norms to :meth:`after_step` (GradNorm).
* ``gradient_parameters = "shared"``: the step hands :meth:`adjust_gradients` each task's gradient on
  the parameters both tasks put gradient on (:meth:`~medmtl.models.two_column.TwoColumnNet.shared_parameters`),
  read between the backward passes at no extra backward, and writes back the combined gradient the
  method returns (gradient surgery: PCGrad, CAGrad, MetaBalance). Methods that declare nothing cost nothing.

Adding a method: its file here, its config class in :mod:`medmtl.config` (plus its entry in the
``WeightingConfig`` union), one line in :data:`medmtl.weighting.METHODS`.

Rank independence: a method's state must depend only on its config and on the numbers the step hands
it (losses averaged over ranks, norms of all-reduced gradients, all-reduced per-task gradients), never
on the rank or on a global RNG, so that every rank holds bit-identical weights.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LossWeighting"]


class LossWeighting(nn.Module):
    """Base class: fixed weights in the buffer ``weights`` (one per task, in ``tasks`` order).

    Args:
        cfg: the method's config section (its declarations ``probe_depth`` and ``gradient_parameters``).
        tasks: task names, in the order of ``weights``.
    """

    def __init__(self, *, cfg, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.cfg = cfg
        self.tasks = tuple(tasks)
        self.register_buffer("weights", torch.ones(len(tasks)))

    @property
    def probe_depth(self) -> str | None:
        """Depth whose parameters get per-task gradient norms for :meth:`after_step` (None: no probe)."""
        return self.cfg.probe_depth

    @property
    def needs_grad_norms(self) -> bool:
        """True when :meth:`after_step` needs ``G_i`` (the config names a probe depth)."""
        return self.probe_depth is not None

    @property
    def gradient_parameters(self) -> str | None:
        """``"shared"`` when :meth:`adjust_gradients` is to be called with per-task gradients; None otherwise."""
        return self.cfg.gradient_parameters

    def select_tasks(self, available: tuple[str, ...]) -> tuple[str, ...]:
        """Tasks to forward this step (called once per step, before any forward); all of them by default."""
        return tuple(available)

    def task_terms(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weighted term of each task, ``w_i * L_i`` (the weights are constants for the network)."""
        return {t: self.weights[i].detach() * losses[t] for i, t in enumerate(self.tasks) if t in losses}

    def adjust_gradients(self, task_grads: dict[str, list[torch.Tensor]]) -> list[torch.Tensor] | None:
        """Combine the tasks' gradients on the shared parameters into the gradient the optimizer applies.

        Called once per step, only when :attr:`gradient_parameters` is set, after the gradients were
        averaged over ranks and before the sharing penalties are back-propagated, clipping and the
        optimizer step. ``task_grads`` maps each forwarded task to its gradient of ``w_i L_i`` on every
        shared parameter, one tensor per parameter in the order of ``TwoColumnNet.shared_parameters()``:
        unscaled (no fp16 loss scale), averaged over ranks (identical on every rank), float32 like the
        parameters. Return the combined gradient in the same layout (it replaces the sum of the task
        gradients on those parameters), or None to keep the sum. The tensors are the step's own
        buffers: a method may modify and return them. The step may still be skipped afterwards
        (non-finite gradients); a method's state should change in :meth:`after_step`, which says so.
        """
        return None

    def after_step(self, losses: dict[str, float], grad_norms: dict[str, float] | None, *, applied: bool) -> None:
        """Update internal state from this step's unweighted losses of the forwarded tasks.

        ``grad_norms`` holds ``G_i`` when the step had a probe (else None); ``applied=False`` for a
        skipped step (non-finite gradients), after which no method may change its weights.
        """

    def log_values(self) -> dict[str, float]:
        """Current weights (and method internals) for tracking."""
        return {f"weight/{t}": float(self.weights[i]) for i, t in enumerate(self.tasks)}

    def param_groups(self) -> list[dict]:
        """Parameters the network optimizer must train (e.g. uncertainty log-variances); none by default."""
        return []
