"""PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", NeurIPS), Algorithm 1.

On the shared parameters, for every task ``i``: ``g_i^PC = g_i``; then, for every other task ``j`` in a
random order drawn for this step, if ``g_i^PC . g_j < 0`` project the conflicting component away,
``g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j`` (against the *original* ``g_j``). The update is
``sum_i g_i^PC`` (sum scale: with no conflict it is exactly equal weighting). Task-specific parameters
(heads, a column's own stages) keep their own task's gradient, as in the paper.

Every ``g_i^PC`` stays a linear combination ``sum_k C_ik g_k`` of the original gradients, so the whole
algorithm runs on the ``T x T`` Gram matrix (``g_i^PC . g_j = sum_k C_ik G_kj``) and the parameters are
touched once, for ``sum_k (sum_i C_ik) g_k``; no extra backward pass (LibMTL pays one per task).

The random order: with two tasks each task has one other task, so the order cannot change the result;
it is still drawn as published (it matters from three tasks on). The draws come from a counter-based
generator keyed by ``(seed, draw index)`` with the index in a buffer: no global RNG, identical on every
rank, and a restored ``state_dict`` continues the same sequence.
"""

from __future__ import annotations

import numpy as np
import torch

from medmtl.config import PCGradConfig
from medmtl.weighting.gradient_level import Combination, GradientCombination, split_like

__all__ = ["PCGrad", "pcgrad_coefficients"]


def pcgrad_coefficients(gram: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """``beta`` with ``sum_i g_i^PC = sum_k beta_k g_k``, from the Gram matrix ``(T, T)`` and, per task ``i``,
    the order in which the other tasks are visited."""
    T = gram.shape[0]
    C = np.eye(T)
    for i in range(T):
        for j in orders[i]:
            dot = float(C[i] @ gram[:, j])
            if dot < 0 and gram[j, j] > 0:
                C[i, j] -= dot / gram[j, j]
    return C.sum(axis=0)


class PCGrad(GradientCombination):
    """Project each task's gradient off the other tasks' gradients it conflicts with; sum the results."""

    def __init__(self, *, cfg: PCGradConfig, tasks: tuple[str, ...]) -> None:
        super().__init__(cfg=cfg, tasks=tasks)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def orders(self, n: int) -> list[list[int]]:
        """This step's visiting order of the other tasks for each of ``n`` tasks (advances the draw index)."""
        rng = np.random.default_rng([self.cfg.seed, int(self.draws)])
        self.draws += 1
        return [[int(j) for j in rng.permutation(n) if j != i] for i in range(n)]

    def combine(self, tasks, flat, gram, grads):
        """``sum_i g_i^PC`` as one linear combination of the task gradients."""
        beta = pcgrad_coefficients(gram.numpy(), self.orders(len(tasks)))
        combined = torch.as_tensor(beta, dtype=flat.dtype, device=flat.device) @ flat
        return Combination(split_like(combined, grads[0]), {t: float(beta[k]) for k, t in enumerate(tasks)})
