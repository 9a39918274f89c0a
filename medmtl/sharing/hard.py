"""Hard parameter sharing (baseline): the chosen stages are one module used by both columns.

With ``depths: all`` this is the classic one-column network with one head per modality.
"""

from __future__ import annotations

from torch import nn

from medmtl.config import HardSharingConfig
from medmtl.sharing.base import SharingMechanism

__all__ = ["HardSharing"]


class HardSharing(SharingMechanism):
    """Replaces the MR column's chosen stages by the CT column's (same parameters, same buffers)."""


    def __init__(self, *, cfg: HardSharingConfig) -> None:
        super().__init__(cfg=cfg)

    def attach(self, ct: nn.Module, mr: nn.Module) -> None:
        """Tie the stages."""
        for depth in self.cfg.resolved_depths(ct.depth_names):
            mr.stages[depth] = ct.stages[depth]
