"""Dynamic Weight Average (Liu, Johns and Davison 2019, "End-to-End Multi-Task Learning with Attention").

``w_i(e) = T exp(r_i(e-1) / temp) / sum_j exp(r_j(e-1) / temp)`` with ``r_i(e-1) = L_i(e-1) / L_i(e-2)``,
where ``L_i(e)`` is task i's mean loss over epoch ``e`` and ``T`` the number of tasks; ``w_i = 1`` in the
first two epochs (no ratio yet). A task whose loss falls slowly gets more weight.

Training here is iteration based (random patches, no pass over a dataset), so an "epoch" is
``steps_per_epoch`` *applied* steps, set in the DWA config rather than derived from the data: the number
of patches in a dataset says nothing about how long a loss mean must run to be smooth. Skipped steps
(non-finite gradients) neither count nor contribute their losses, so the weights only move at the
boundary of a full epoch of applied steps and a skipped step leaves them untouched.
"""

from __future__ import annotations

import torch

from medmtl.config import DWAConfig
from medmtl.weighting.base import LossWeighting

__all__ = ["DynamicWeightAverage"]


class DynamicWeightAverage(LossWeighting):
    """Weights from the ratio of the last two epoch-mean losses, softmax with temperature."""

    def __init__(self, *, cfg: DWAConfig, tasks: tuple[str, ...]) -> None:
        super().__init__(cfg=cfg, tasks=tasks)
        n = len(tasks)
        # float64 sums: a mean over hundreds of steps should not drift with the summation order
        self.register_buffer("epoch_loss_sum", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("epoch_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))
        # row 0: mean loss of epoch e-2, row 1: of epoch e-1
        self.register_buffer("epoch_means", torch.zeros(2, n, dtype=torch.float64))
        self.register_buffer("ratios", torch.ones(n, dtype=torch.float64))

    @torch.no_grad()
    def after_step(self, losses: dict[str, float], grad_norms: dict[str, float] | None, *, applied: bool) -> None:
        """Accumulate this step's losses; at the end of an epoch, recompute the weights."""
        if not applied:
            return
        self.epoch_loss_sum += torch.tensor([float(losses[t]) for t in self.tasks], dtype=torch.float64, device=self.epoch_loss_sum.device)
        self.epoch_steps += 1
        if int(self.epoch_steps) < self.cfg.steps_per_epoch:
            return
        self.epoch_means.copy_(torch.stack([self.epoch_means[1], self.epoch_loss_sum / self.epoch_steps]))
        self.epoch_loss_sum.zero_()
        self.epoch_steps.zero_()
        self.epochs_done += 1
        if int(self.epochs_done) >= 2:
            self.ratios.copy_(self.epoch_means[1] / self.epoch_means[0])
            w = len(self.tasks) * torch.softmax(self.ratios / self.cfg.temperature, dim=0)
            self.weights.copy_(w.to(self.weights.dtype))

    def log_values(self) -> dict[str, float]:
        """Weights, the last loss ratios ``r_i`` and the number of finished epochs."""
        out = super().log_values()
        out.update({f"dwa/r/{t}": float(self.ratios[i]) for i, t in enumerate(self.tasks)})
        out["dwa/epochs"] = float(self.epochs_done)
        return out
