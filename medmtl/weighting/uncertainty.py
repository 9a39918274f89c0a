"""Uncertainty weighting (Kendall, Gal and Cipolla 2018, "Multi-Task Learning Using Uncertainty to
Weigh Losses for Scene Geometry and Semantics").

Each task has a learned log-variance ``s_i = log sigma_i^2`` and contributes ``exp(-s_i) L_i + s_i``;
the ``s_i`` are trained by the network optimizer (:meth:`UncertaintyWeighting.param_groups`), and the
reported weight is ``exp(-s_i)``.

The 1/2 convention: the paper's Gaussian (regression) form is ``1/(2 sigma^2) L + log sigma =
1/2 (exp(-s) L + s)`` and its softmax (classification) form ``1/sigma^2 L + log sigma = exp(-s) L + s/2``.
Dice+CE is not a likelihood, so we take the regression form, as LibMTL's UW and MTAN's code do, times 2:
``exp(-s_i) L_i + s_i``. At ``s = 0`` that is exactly ``L_i`` (training starts as equal weighting), and
the optimum ``exp(-s_i*) = 1 / L_i`` weighs each task by its inverse loss. Both tasks use the same form,
so the CT:MR weight ratio is that of any of the paper's forms; only the overall loss scale differs.
"""

from __future__ import annotations

import torch

from medmtl.config import UncertaintyWeightingConfig
from medmtl.weighting.base import LossWeighting

__all__ = ["UncertaintyWeighting"]


class UncertaintyWeighting(LossWeighting):
    """Learned log-variances ``s_i``: term ``exp(-s_i) L_i + s_i``, weight ``exp(-s_i)``."""

    def __init__(self, *, cfg: UncertaintyWeightingConfig, tasks: tuple[str, ...]) -> None:
        super().__init__(cfg=cfg, tasks=tasks)
        self.log_variance = torch.nn.Parameter(torch.full((len(tasks),), float(cfg.init_log_variance)))
        with torch.no_grad():
            self.weights.copy_(torch.exp(-self.log_variance))

    def task_terms(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``exp(-s_i) L_i + s_i``; not detached, so the backward pass also reaches the ``s_i``."""
        s = self.log_variance
        return {t: torch.exp(-s[i]).to(losses[t].dtype) * losses[t] + s[i].to(losses[t].dtype)
                for i, t in enumerate(self.tasks) if t in losses}

    def after_step(self, losses: dict[str, float], grad_norms: dict[str, float] | None, *, applied: bool) -> None:
        """Refresh the reported weights (the network optimizer has already moved, or skipped, the ``s_i``)."""
        with torch.no_grad():
            self.weights.copy_(torch.exp(-self.log_variance))

    def log_values(self) -> dict[str, float]:
        """Weights ``exp(-s_i)`` and the log-variances ``s_i``."""
        s = self.log_variance.detach()
        out = {f"weight/{t}": float(torch.exp(-s[i])) for i, t in enumerate(self.tasks)}
        out.update({f"uncertainty/log_variance/{t}": float(s[i]) for i, t in enumerate(self.tasks)})
        return out

    def param_groups(self) -> list[dict]:
        """The ``s_i`` as their own group: no weight decay (it would pull every weight towards 1)."""
        group = {"params": [self.log_variance], "weight_decay": 0.0, "name": "weighting/uncertainty"}
        if self.cfg.lr is not None:
            group["lr"] = self.cfg.lr
        return [group]
