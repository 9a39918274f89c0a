"""GradNorm (Chen et al. 2018, "GradNorm: Gradient Normalization for Adaptive Loss Balancing").

With ``G_i = ||grad_W (w_i L_i)||_2``, ``L~_i = L_i / L_i(0)``, ``r_i = L~_i / mean_j L~_j``:
``L_grad = sum_i |G_i - mean_j(G_j) * r_i^alpha|``, the target ``mean(G) r_i^alpha`` held constant.
The weights are updated from ``dL_grad/dw_i`` only, by their own Adam optimizer, then renormalized
to sum to the number of tasks; the network is trained on ``sum_i w_i L_i`` (heads included).

``G_i`` is measured by the trainer between the two tasks' backward passes (disjoint forward graphs),
so no extra backward pass is spent. Since ``w_i`` is a scalar, ``G_i = w_i * g_i`` with
``g_i = ||grad_W L_i||`` and ``dG_i/dw_i = g_i``; the update differentiates exactly this.
"""

from __future__ import annotations

import copy

import torch

from medmtl.config import GradNormConfig
from medmtl.weighting.base import LossWeighting

__all__ = ["GradNorm"]


class GradNorm(LossWeighting):
    """Task weights trained to equalize gradient norms relative to training rates."""

    def __init__(self, *, cfg: GradNormConfig, tasks: tuple[str, ...]) -> None:
        super().__init__(cfg=cfg, tasks=tasks)
        self.w = torch.nn.Parameter(torch.ones(len(tasks)), requires_grad=True)
        self.register_buffer("initial_loss_sum", torch.zeros(len(tasks), dtype=torch.float64))
        self.register_buffer("initial_loss_count", torch.zeros((), dtype=torch.long))
        self.optimizer = torch.optim.Adam([self.w], lr=cfg.lr)
        self.last: dict[str, float] = {}

    def task_terms(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``w_i * L_i`` with the current weights (constants for the network's backward)."""
        return {t: self.w[i].detach().to(losses[t].dtype) * losses[t] for i, t in enumerate(self.tasks) if t in losses}

    @torch.no_grad()
    def _initial_losses(self, losses: torch.Tensor) -> torch.Tensor:
        if int(self.initial_loss_count) < self.cfg.initial_loss_steps:
            self.initial_loss_sum += losses.double()
            self.initial_loss_count += 1
        return (self.initial_loss_sum / self.initial_loss_count).to(losses.dtype)

    def after_step(self, losses: dict[str, float], grad_norms: dict[str, float] | None, *, applied: bool) -> None:
        """One GradNorm update from this step's losses and measured ``G_i``; nothing on a skipped step."""
        if not applied or grad_norms is None:
            return
        # on w's device: the weighting module follows the net to CUDA, and mixing devices would fail there
        L = torch.tensor([float(losses[t]) for t in self.tasks], device=self.w.device)
        G_measured = torch.tensor([float(grad_norms[t]) for t in self.tasks], device=self.w.device)
        if not bool(torch.isfinite(L).all() and torch.isfinite(G_measured).all()):
            return  # an inf norm would turn the weights into NaN for the rest of the run; treat as skipped
        L0 = self._initial_losses(L)
        ratio = L / L0
        r = ratio / ratio.mean()
        w = self.w
        g = G_measured / w.detach().clamp_min(1e-12)  # ||grad_W L_i||: independent of w_i
        G = w * g
        target = (G.mean() * r.pow(self.cfg.alpha)).detach()
        L_grad = (G - target).abs().sum()
        self.optimizer.zero_grad(set_to_none=True)
        (grad_w,) = torch.autograd.grad(L_grad, [w])
        w.grad = grad_w
        self.optimizer.step()
        with torch.no_grad():
            w.clamp_(min=1e-6)
            w.mul_(len(self.tasks) / w.sum())
            self.weights.copy_(w.detach())
        self.last = {"L_grad": float(L_grad.detach()), **{f"G/{t}": float(G_measured[i]) for i, t in enumerate(self.tasks)},
                     **{f"r/{t}": float(r[i]) for i, t in enumerate(self.tasks)}}

    def log_values(self) -> dict[str, float]:
        """Weights plus the last update's ``G_i``, ``r_i`` and ``L_grad``."""
        out = {f"weight/{t}": float(self.w[i].detach()) for i, t in enumerate(self.tasks)}
        out.update({f"gradnorm/{k}": v for k, v in self.last.items()})
        return out

    def state_dict(self, *args, **kwargs):
        """Module state plus the Adam state of the task weights (a deep copy)."""
        sd = super().state_dict(*args, **kwargs)
        # a copy: Adam's load_state_dict keeps tensors it is given, so a live reference would be shared
        sd["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        return sd

    def load_state_dict(self, state_dict, strict: bool = True):
        """Inverse of :meth:`state_dict`."""
        state_dict = dict(state_dict)
        opt = state_dict.pop("optimizer", None)
        result = super().load_state_dict(state_dict, strict=strict)
        if opt is not None:
            self.optimizer.load_state_dict(opt)
        return result
