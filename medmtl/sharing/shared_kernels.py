"""Shared kernels with modality-specific normalization (Dou et al. 2020, "Unpaired multi-modal
segmentation via knowledge distillation"): convolutions and activations are one set of parameters,
each modality keeps its own normalization layers (statistics and affine parameters).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.normalization import GroupNorm, LayerNorm

from medmtl.config import SharedKernelsConfig
from medmtl.sharing.base import SharingMechanism

__all__ = ["SharedKernels"]

_NORM_TYPES = (_NormBase, GroupNorm, LayerNorm)


class SharedKernels(SharingMechanism):
    """Ties every non-normalization leaf module of the chosen stages to the CT column's."""


    def __init__(self, *, cfg: SharedKernelsConfig) -> None:
        super().__init__(cfg=cfg)

    def attach(self, ct: nn.Module, mr: nn.Module) -> None:
        """Replace the MR stage's convolutions (and activations) by the CT stage's modules."""
        for depth in self.cfg.resolved_depths(ct.depth_names):
            src = dict(ct.stages[depth].named_modules())
            for name, module in list(mr.stages[depth].named_modules()):
                has_params = any(True for _ in module.parameters(recurse=False))
                if not has_params or isinstance(module, _NORM_TYPES) or next(module.children(), None) is not None:
                    continue
                parent_name, _, attr = name.rpartition(".")
                parent = mr.stages[depth].get_submodule(parent_name) if parent_name else mr.stages[depth]
                setattr(parent, attr, src[name])
