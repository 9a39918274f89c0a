"""The small interface every sharing mechanism implements.

A mechanism is attached once to the CT and MR columns. It may tie parameters (hard sharing, shared
kernels), add a penalty on parameters (soft sharing), mix the columns' activations after chosen
stages (cross-stitch, sluice), or mix layers before the heads (sluice). The two-column net and the
trainer only use this interface; no mechanism is named anywhere else.

What a mechanism *is* (mixes activations, ties parameters, penalizes parameters, mixes the head input,
which depths it acts at with ``"all"`` expanded) is declared once, on its config class in
:mod:`medmtl.config` (``_SharingBase``): the config validator and the network both read it from there
(``self.cfg``). Adding a mechanism: its file here, its config class (plus its entry in the
``SharingConfig`` union), and one line in :data:`medmtl.sharing.MECHANISMS`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SharingMechanism"]


class SharingMechanism(nn.Module):
    """Base class: defaults are "does nothing", so each mechanism overrides only what it uses.

    Subclasses take ``cfg`` (their config section) as the only keyword of their constructor.
    """

    def __init__(self, *, cfg) -> None:
        super().__init__()
        self.cfg = cfg

    @property
    def kind(self) -> str:
        """The config's ``kind``: prefix of logged values and penalty keys."""
        return self.cfg.kind

    @property
    def mixes_activations(self) -> bool:
        """The config's declaration: :meth:`mix` changes activations, so each batch runs through both columns."""
        return self.cfg.mixes_activations

    def attach(self, ct: nn.Module, mr: nn.Module) -> None:
        """Bind to the two columns (called once, before the optimizer is built)."""

    def exclusive_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Modality -> parameters (the mechanism's own, or ones it placed in a column) that only that
        modality's forward uses, although they sit where the other modality's path runs (e.g. sluice's
        beta of one modality); the net's :meth:`~medmtl.models.two_column.TwoColumnNet.shared_parameters`
        leaves them out. None by default."""
        return {}

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

    def forward_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the forward pass just run (e.g. a router's balance loss), already weighted,
        keyed by depth; the step adds them to that task's term before its backward pass. Cleared on read."""
        return {}

    @property
    def freezes_base(self) -> bool:
        """The config's declaration: only :meth:`adapter_parameters` train (every other parameter is frozen)."""
        return self.cfg.freezes_base

    @property
    def merges_into_kernels(self) -> bool:
        """The config's declaration: its low-rank deltas fold into per-modality kernels for deployment."""
        return self.cfg.merges_into_kernels

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The mechanism's adapters (low-rank deltas, routers): what trains when :attr:`freezes_base`."""
        return []

    def log_values(self) -> dict[str, float]:
        """Scalars worth tracking (penalty per depth, mixing coefficients), keyed ``kind/depth/...``."""
        return {}
