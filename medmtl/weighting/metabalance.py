"""MetaBalance (He et al. 2022, "MetaBalance: Improving Multi-Task Recommendations via Adapting Gradient
Magnitudes of Auxiliary Tasks", WWW), Algorithm 1.

One task is the target ("main") task, the others auxiliary. On the shared parameters, per step, with
moving averages of the gradient magnitudes (``m = 0`` at the start, as published: the common bias of
``m_main`` and ``m_aux`` cancels in their ratio)

    m_main <- beta m_main + (1 - beta) ||g_main||          m_aux <- beta m_aux + (1 - beta) ||g_aux||
    g_aux  <- r (m_main / m_aux) g_aux + (1 - r) g_aux     (r: the relax factor)

and the update is ``g_main + sum_aux g_aux`` (sum scale, as equal weighting: ``r = 0`` is exactly equal
weighting). ``r = 1`` gives every auxiliary gradient the main gradient's magnitude; smaller ``r`` keeps
part of its own. As in the authors' released optimizer, magnitudes and moving averages are per
parameter tensor (each weight and bias of the shared stages separately). A parameter whose auxiliary
moving average is still 0 keeps its (zero) auxiliary gradient unscaled: no epsilon distorts small norms.

CT and MR: ``main_task`` in the config names the target task (default ``ct``); the other one's gradient
is rescaled toward it. Choose the modality whose segmentation is the product, or run both in the study.

The moving averages change only for applied steps (``after_step``); a skipped step leaves them as they
were. They are a buffer ``(T, P)`` (P shared parameter tensors), sized on the first step and on loading.
"""

from __future__ import annotations

import torch

from medmtl.config import MetaBalanceConfig
from medmtl.weighting.gradient_level import Combination, GradientCombination

__all__ = ["MetaBalance"]


class MetaBalance(GradientCombination):
    """Rescale the auxiliary task's gradient toward the main task's moving-average magnitude, per parameter."""

    def __init__(self, *, cfg: MetaBalanceConfig, tasks: tuple[str, ...]) -> None:
        if cfg.main_task not in tasks:
            raise ValueError(f"weighting.main_task: {cfg.main_task!r} is not a task ({', '.join(tasks)})")
        super().__init__(cfg=cfg, tasks=tasks)
        # rows in ``tasks`` order, one column per shared parameter tensor
        self.register_buffer("moving_norm", torch.zeros(len(tasks), 0, dtype=torch.float64))

    def combine(self, tasks, flat, gram, grads):
        """``g_main + sum_aux (r m_main / m_aux + 1 - r) g_aux`` per parameter tensor."""
        beta, r = self.cfg.beta, self.cfg.relax_factor
        rows = [self.tasks.index(t) for t in tasks]
        norms = torch.stack([torch.stack(torch._foreach_norm(gs)) for gs in grads]).double().cpu()  # (T', P)
        previous = self.moving_norm.cpu()
        if previous.shape[1] != norms.shape[1]:
            previous = torch.zeros(len(self.tasks), norms.shape[1], dtype=torch.float64)
        moving = previous.clone()
        moving[rows] = beta * previous[rows] + (1.0 - beta) * norms
        main = self.tasks.index(self.cfg.main_task)
        out = [g.clone() for g in grads[tasks.index(self.cfg.main_task)]]
        coefficients = {self.cfg.main_task: 1.0}
        for k, t in enumerate(tasks):
            if t == self.cfg.main_task:
                continue
            m_aux = moving[self.tasks.index(t)]
            ratio = torch.where(m_aux > 0, moving[main] / m_aux.clamp_min(1e-300), torch.ones_like(m_aux))
            scale = (r * ratio + (1.0 - r)).tolist()
            torch._foreach_add_(out, torch._foreach_mul(grads[k], scale))
            coefficients[t] = sum(scale) / len(scale)
        return Combination(out, coefficients, state={"moving_norm": moving})

    def commit(self, state: dict) -> None:
        """Store the moving averages of an applied step."""
        moving = state["moving_norm"].to(self.moving_norm.device)
        if self.moving_norm.shape != moving.shape:
            self.moving_norm = moving.clone()
        else:
            self.moving_norm.copy_(moving)

    def load_state_dict(self, state_dict, strict: bool = True):
        """Resize the moving averages to the stored number of shared parameters, then load as usual."""
        stored = state_dict.get("moving_norm")
        if stored is not None and stored.shape != self.moving_norm.shape:
            self.moving_norm = torch.zeros_like(stored, device=self.moving_norm.device)
        return super().load_state_dict(state_dict, strict=strict)
