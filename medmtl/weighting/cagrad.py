"""CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS), Algorithm 1.

The update ``d`` maximizes the worst task's improvement ``min_i g_i . d`` within a ball around the
average gradient ``g0 = mean_i g_i``: ``||d - g0|| <= c ||g0||``. Its dual is

    min_{w in simplex}  F(w) = g_w . g0 + sqrt(phi) ||g_w||,   g_w = sum_i w_i g_i,   phi = c^2 ||g0||^2,

and ``d = g0 + (sqrt(phi) / ||g_w||) g_w``. ``c = 0`` gives ``d = g0``.

Two tasks, closed form (no iterative solver): with ``w = (x, 1 - x)``, ``u = g_1 - g_2`` and ``g_w = g_2 + x u``,
split ``g_w`` into its length ``t`` along ``u`` and the fixed part ``h`` orthogonal to ``u``; ``F`` is convex
and ``F'(x) = g0 . u + sqrt(phi) ||u|| t / sqrt(t^2 + h^2)``, zero at ``t = k h / sqrt(1 - k^2)`` with
``k = -g0 . u / (sqrt(phi) ||u||)``; the minimizer on ``[0, 1]`` is that point clipped, or an end point when
``|k| >= 1``. Everything is read from the Gram matrix (float64), and ``d`` is one linear combination.

Scale: the hook's result replaces the *sum* of the task gradients, so we return ``T d`` (optionally divided
by the authors' code's rescaling, ``1 + c^2`` or ``1 + c``; the paper has none, our default). With ``c = 0``
that is ``sum_i g_i``: exactly equal weighting. No extra backward pass (LibMTL pays one per task).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medmtl.config import CAGradConfig
from medmtl.weighting.gradient_level import Combination, GradientCombination, split_like

__all__ = ["CAGrad", "cagrad_dual_weights"]


def cagrad_dual_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """The dual minimizer ``w = (x, 1 - x)`` of CAGrad for two tasks from their ``(2, 2)`` Gram matrix."""
    a, b, d = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
    e = a - 2 * b + d  # ||u||^2
    if e <= 1e-12 * max(a, d, 1e-30):
        return np.array([0.5, 0.5])  # equal gradients: g_w is the same for every w
    s = c * math.sqrt(max((a + 2 * b + d) / 4, 0.0))  # sqrt(phi)
    m = (a - d) / 2  # g0 . u
    p = b - d  # g_2 . u
    if s == 0.0:
        x = 0.0 if m > 0 else 1.0  # F is linear in x
    else:
        k = -m / (s * math.sqrt(e))
        if abs(k) >= 1.0:
            x = 0.0 if m > 0 else 1.0
        else:
            h = math.sqrt(max(d - p * p / e, 0.0))
            t = k * h / math.sqrt(1 - k * k)
            x = min(max((t * math.sqrt(e) - p) / e, 0.0), 1.0)
    return np.array([x, 1.0 - x])


def cagrad_coefficients(gram: np.ndarray, c: float, rescale: str) -> tuple[np.ndarray, np.ndarray]:
    """``(beta, w)``: the returned update is ``sum_k beta_k g_k = T d / rescale``; ``w`` the dual weights."""
    T = gram.shape[0]
    w = cagrad_dual_weights(gram, c)
    s = c * math.sqrt(max(float(gram.sum()) / T**2, 0.0))
    gw_norm = math.sqrt(max(float(w @ gram @ w), 0.0))
    lam = s / gw_norm if gw_norm > 0 else 0.0
    divisor = {"none": 1.0, "one_plus_c_squared": 1.0 + c * c, "one_plus_c": 1.0 + c}[rescale]
    return T * (1.0 / T + lam * w) / divisor, w


class CAGrad(GradientCombination):
    """The update within ``c ||g0||`` of the average gradient that best improves the worst task (two tasks)."""

    def __init__(self, *, cfg: CAGradConfig, tasks: tuple[str, ...]) -> None:
        if len(tasks) != 2:
            raise ValueError(f"cagrad: the dual is solved in closed form for two tasks, got {len(tasks)} ({', '.join(tasks)})")
        super().__init__(cfg=cfg, tasks=tasks)

    def combine(self, tasks, flat, gram, grads):
        """``T d``, one linear combination of the two task gradients."""
        beta, w = cagrad_coefficients(gram.numpy(), self.cfg.c, self.cfg.rescale)
        combined = torch.as_tensor(beta, dtype=flat.dtype, device=flat.device) @ flat
        return Combination(split_like(combined, grads[0]), {t: float(beta[k]) for k, t in enumerate(tasks)},
                           extra={f"cagrad/dual_weight/{t}": float(w[k]) for k, t in enumerate(tasks)})
