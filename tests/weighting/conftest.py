"""A toy two-task problem the real training step can run in milliseconds.

A shared layer ``W`` (``net.shared``) feeds one linear head per task; the CT target is 10x the MR
target in amplitude, so the CT loss is about 100x the MR loss: the imbalance loss weighting exists for.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medmtl.config import validate_config
from medmtl.training.precision import Precision
from medmtl.training.step import GradientProbe, TaskGradients, train_step
from medmtl.weighting import build_weighting

TASKS = ("ct", "mr")


class ToyTwoTask(nn.Module):
    """``forward(x, task)``: ``(B, 8) -> (B, 1)`` through the shared layer and the task's head; no penalties."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 16)
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in TASKS})
        self.forwards = {t: 0 for t in TASKS}

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        self.forwards[task] += 1
        return self.heads[task](torch.tanh(self.shared(x)))

    def penalties(self) -> dict[str, torch.Tensor]:
        return {}


class ToyProblem:
    """Net, data stream (seeded), weighting, SGD, a probe on ``W`` and, for gradient-level methods, the per-task
    gradients on ``W``; :meth:`step` runs the real ``train_step``."""

    def __init__(self, weighting: dict, *, lr: float = 0.02, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.net = ToyTwoTask()
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.a = torch.randn(8, 1, generator=self.gen)
        self.b = torch.randn(8, 1, generator=self.gen)
        # hard sharing only so that methods acting on shared parameters validate; the toy net is built here
        cfg = validate_config({"sharing": [{"kind": "hard"}], "weighting": weighting})
        self.weighting = build_weighting(cfg.weighting, TASKS)
        groups = [{"params": list(self.net.parameters())}] + self.weighting.param_groups()
        self.optimizer = torch.optim.SGD(groups, lr=lr)
        self.probe = GradientProbe(list(self.net.shared.parameters()))
        # the shared layer is what both tasks put gradient on (gradient-level methods: PCGrad, CAGrad, ...)
        shared = self.weighting.gradient_parameters == "shared"
        self.task_gradients = TaskGradients(list(self.net.shared.parameters())) if shared else None
        self.precision = Precision("fp32", torch.device("cpu"))

    def batch(self) -> dict:
        x1, x2 = torch.randn(32, 8, generator=self.gen), torch.randn(32, 8, generator=self.gen)
        return {"ct": {"image": x1, "label": 10 * torch.sin(x1 @ self.a)}, "mr": {"image": x2, "label": torch.sin(x2 @ self.b)}}

    def step(self, batch: dict | None = None):
        return train_step(net=self.net, batch=batch or self.batch(), loss_fn=nn.MSELoss(), weighting=self.weighting,
                          optimizer=self.optimizer, precision=self.precision, grad_clip=None, probe=self.probe,
                          task_gradients=self.task_gradients, device=torch.device("cpu"))


@pytest.fixture
def toy():
    """Factory: ``toy({"method": ...}, lr=..., seed=...)`` -> :class:`ToyProblem`."""
    return ToyProblem
