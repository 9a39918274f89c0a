"""Cross-stitch units (Misra et al. 2016): learned linear mixing of two columns' activations.

After stage ``d``: ``[x'_ct; x'_mr] = A_d [x_ct; x_mr]`` with ``A_d`` a 2x2 matrix per channel
(default) or one per depth, initialized near identity ([[0.9, 0.1], [0.1, 0.9]], not LibMTL's all-ones),
trained with its own learning-rate multiplier. Unpaired data: each batch runs through both columns.
"""

from __future__ import annotations

import torch
from torch import nn

from medmtl.config import CrossStitchConfig
from medmtl.sharing.base import SharingMechanism

__all__ = ["CrossStitch"]


class CrossStitch(SharingMechanism):
    """Cross-stitch units at the configured depths; coefficients shaped ``(C or 1, 2, 2)`` per depth."""


    def __init__(self, *, cfg: CrossStitchConfig) -> None:
        super().__init__(cfg=cfg)
        self.alpha = nn.ParameterDict()

    def attach(self, ct: nn.Module, mr: nn.Module) -> None:
        """Create one coefficient tensor per depth with that stage's channel count."""
        init = torch.tensor(self.cfg.init, dtype=torch.float32)
        for depth in self.cfg.depths:
            channels = _stage_out_channels(ct, depth) if self.cfg.per_channel else 1
            self.alpha[depth] = nn.Parameter(init.expand(channels, 2, 2).clone())

    def mix_depths(self) -> list[str]:
        """The configured depths."""
        return list(self.cfg.depths)

    def mix(self, depth: str, x_ct: torch.Tensor, x_mr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel 2x2 mixing; ``(B, C, D, H, W)`` each, coefficients broadcast over space."""
        a = self.alpha[depth].to(x_ct.dtype)
        shape = (1, a.shape[0]) + (1,) * (x_ct.dim() - 2)
        a00, a01, a10, a11 = (a[:, i, j].reshape(shape) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
        return a00 * x_ct + a01 * x_mr, a10 * x_ct + a11 * x_mr

    def param_groups(self, base_lr: float) -> list[dict]:
        """The coefficients, at ``lr_multiplier * base_lr`` and without weight decay."""
        return [{"params": list(self.alpha.values()), "lr": base_lr * self.cfg.lr_multiplier,
                 "weight_decay": 0.0, "name": "sharing/cross_stitch"}]

    def log_values(self) -> dict[str, float]:
        """Channel-mean of each mixing coefficient per depth (``ct_ct``, ``ct_mr``, ``mr_ct``, ``mr_mr``)."""
        out = {}
        with torch.no_grad():
            for depth, a in self.alpha.items():
                m = a.mean(dim=0)
                for (i, j), tag in zip(((0, 0), (0, 1), (1, 0), (1, 1)), ("ct_ct", "ct_mr", "mr_ct", "mr_mr")):
                    out[f"cross_stitch/{depth}/{tag}"] = float(m[i, j])
        return out


def _stage_out_channels(column: nn.Module, depth: str) -> int:
    """Output channels of a named stage (from its last convolution)."""
    convs = [m for m in column.stages[depth].modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    return convs[-1].out_channels
