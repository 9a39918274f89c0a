"""Dropped scheduled task, DST (Malhotra, Vatsa and Singh, "Dropped Scheduled Task: Mitigating Negative
Transfer in Multi-task Learning using Dynamic Task Dropping", arXiv 2020, TMLR 2023; the idea of
training only a selected subset of tasks in a step is also Leang et al. 2020, "Dynamic Task Weighting
Methods for Multi-task Networks in Autonomous Driving Systems", task-based selective backpropagation).

DST drops a task for a step with a probability built from four metrics: task depth, ground-truth
count, training completed and stagnancy. Our two heads sit at the same depth and both tasks have
dense labels in every patch, so the first two are constant here and only the last two are kept:

    progress_i   = clip(1 - L^_i / L_i(0), 0, 1)       L^_i: EMA of task i's loss, L_i(0): its first loss
    stagnancy_i  = min(c_i / stall_patience, 1)         c_i: forwarded steps since L^_i last fell below
                                                        its best by more than stall_tolerance (relative)
    p_i          = max_drop_probability * (progress_share * progress_i + (1 - progress_share) * stagnancy_i)

Each step draws ``u_i ~ U(0, 1)`` and drops task i when ``u_i < p_i``; when every task would be dropped,
the one with the lowest ``p_i`` (then the largest ``u_i``) is kept. A dropped task is not forwarded at
all (compute saved), its loss statistics do not move, and its weight for that step is 0 (kept tasks: 1).

The draws come from a counter-based generator keyed by ``(seed, draw index)``: no global RNG, nothing
per rank, so every rank drops the same task, and a restored ``state_dict`` continues the same sequence.
"""

from __future__ import annotations

import numpy as np
import torch

from medmtl.config import DSTConfig
from medmtl.weighting.base import LossWeighting

__all__ = ["DroppedScheduledTask"]


class DroppedScheduledTask(LossWeighting):
    """Drop a task for a step with a probability growing with its progress and stagnancy."""

    def __init__(self, *, cfg: DSTConfig, tasks: tuple[str, ...]) -> None:
        super().__init__(cfg=cfg, tasks=tasks)
        n = len(tasks)
        self.register_buffer("initial_loss", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("smoothed_loss", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("best_loss", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("stall", torch.zeros(n, dtype=torch.long))
        self.register_buffer("seen", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def progress(self) -> torch.Tensor:
        """``clip(1 - L^_i / L_i(0), 0, 1)``, shape ``(T,)``, float64 (0 for a task never seen)."""
        progress = (1.0 - self.smoothed_loss / self.initial_loss.clamp_min(1e-12)).clamp(0.0, 1.0)
        return torch.where(self.seen, progress, torch.zeros_like(progress))

    def drop_probabilities(self) -> torch.Tensor:
        """``p_i`` of the next draw, shape ``(T,)``, float64 (0 for a task never seen)."""
        progress = self.progress()
        stagnancy = (self.stall.double() / self.cfg.stall_patience).clamp(max=1.0)
        share = self.cfg.progress_share
        p = self.cfg.max_drop_probability * (share * progress + (1.0 - share) * stagnancy)
        return torch.where(self.seen, p, torch.zeros_like(p))

    def select_tasks(self, available: tuple[str, ...]) -> tuple[str, ...]:
        """Draw this step's tasks; at least one of ``available`` is always kept."""
        p = self.drop_probabilities().cpu().numpy()
        u = np.random.default_rng([self.cfg.seed, int(self.draws)]).random(len(self.tasks))
        self.draws += 1
        idx = [i for i, t in enumerate(self.tasks) if t in available]
        kept = [i for i in idx if u[i] >= p[i]]
        if not kept and idx:
            kept = [min(idx, key=lambda i: (p[i], -u[i]))]
        with torch.no_grad():
            self.weights.zero_()
            self.weights[kept] = 1.0
        return tuple(self.tasks[i] for i in kept)

    @torch.no_grad()
    def after_step(self, losses: dict[str, float], grad_norms: dict[str, float] | None, *, applied: bool) -> None:
        """Update the forwarded tasks' smoothed loss and stall counters (nothing on a skipped step)."""
        if not applied:
            return
        beta, tol = self.cfg.ema, self.cfg.stall_tolerance
        for i, t in enumerate(self.tasks):
            if t not in losses:
                continue
            loss = float(losses[t])
            if not bool(self.seen[i]):
                self.initial_loss[i] = self.smoothed_loss[i] = self.best_loss[i] = loss
                self.seen[i] = True
                continue
            self.smoothed_loss[i] = beta * self.smoothed_loss[i] + (1.0 - beta) * loss
            if self.smoothed_loss[i] < self.best_loss[i] * (1.0 - tol):
                self.best_loss[i] = self.smoothed_loss[i]
                self.stall[i] = 0
            else:
                self.stall[i] += 1

    def log_values(self) -> dict[str, float]:
        """This step's weights (1 kept, 0 dropped), the next drop probabilities, progress and stall counts."""
        out = super().log_values()
        p, progress = self.drop_probabilities(), self.progress()
        for i, t in enumerate(self.tasks):
            out[f"dst/drop_probability/{t}"] = float(p[i])
            out[f"dst/progress/{t}"] = float(progress[i])
            out[f"dst/stall/{t}"] = float(self.stall[i])
        return out
