"""The small interface every sharing mechanism implements.

A mechanism is attached once to the CT and MR columns. It may tie parameters (hard sharing, shared
kernels), add a penalty on parameters (soft sharing), or mix the columns' activations after chosen
stages (cross-stitch, sluice), or mix layers before the heads (sluice). The two-column net and the trainer only use this interface; no mechanism is
named anywhere else.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

__all__ = ["SharingMechanism", "resolve_depths"]


def resolve_depths(depths: list[str] | str, available: list[str]) -> list[str]:
    """Expand ``"all"`` to every depth name; keep the given order otherwise."""
    return list(available) if depths == "all" else list(depths)


class SharingMechanism(nn.Module):
    """Base class: defaults are "does nothing", so each mechanism overrides only what it uses."""

    #: True when :meth:`mix` changes activations; each batch then runs through both columns.
    mixes_activations: ClassVar[bool] = False
    #: short name used as the prefix of logged values
    kind: ClassVar[str] = "none"

    def attach(self, ct: nn.Module, mr: nn.Module) -> None:
        """Bind to the two columns (called once, before the optimizer is built)."""

    def mix_depths(self) -> list[str]:
        """Depth names after which :meth:`mix` must be called."""
        return []

    def mix(self, depth: str, x_ct: torch.Tensor, x_mr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix the two columns' outputs of stage ``depth``; both ``(B, C, D, H, W)``."""
        return x_ct, x_mr

    def head_input_depths(self) -> list[str]:
        """Depth names whose outputs :meth:`head_input` mixes before the heads (empty: the last stage feeds the head)."""
        return []

    def head_input(self, modality: str, layers: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mix ``layers`` (depth -> ``(B, C, D, H, W)`` of ``modality``'s column) into that modality's head input."""
        raise NotImplementedError(f"{type(self).__name__} does not mix layers before the heads")

    def penalties(self) -> dict[str, torch.Tensor]:
        """Penalty terms to add to the loss, keyed by depth (already multiplied by their weights)."""
        return {}

    def param_groups(self, base_lr: float) -> list[dict]:
        """Optimizer parameter groups for the mechanism's own parameters (e.g. a learning-rate multiplier)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": base_lr, "name": f"sharing/{self.kind}"}] if params else []

    def log_values(self) -> dict[str, float]:
        """Scalars worth tracking (penalty per depth, mixing coefficients), keyed ``kind/depth/...``."""
        return {}
