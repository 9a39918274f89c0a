"""Soft parameter sharing (Duong et al. 2015; Evgeniou & Pontil 2004).

Penalty ``sum_d lambda_d * sum_p ||theta^ct_{d,p} - theta^mr_{d,p}||_F^2`` over the corresponding
parameters ``p`` of each chosen depth ``d``. Normalization layers and biases may stay
modality-specific (``exclude_norm_and_bias``), since intensity statistics differ between CT and MR.
The distance is computed with foreach kernels, one launch per depth rather than one per tensor.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.normalization import GroupNorm, LayerNorm

from medmtl.config import SoftSharingConfig
from medmtl.sharing.base import SharingMechanism

__all__ = ["SoftSharing", "penalized_parameters"]

_NORM_TYPES = (_NormBase, GroupNorm, LayerNorm)


def penalized_parameters(stage: nn.Module, *, exclude_norm_and_bias: bool) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of a stage that the penalty couples, in a stable order."""
    out = []
    for mod_name, module in stage.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if exclude_norm_and_bias and (isinstance(module, _NORM_TYPES) or p_name == "bias"):
                continue
            out.append((f"{mod_name}.{p_name}" if mod_name else p_name, p))
    return out


class SoftSharing(SharingMechanism):
    """Squared-distance penalty between the CT and MR parameters of chosen depths."""


    def __init__(self, *, cfg: SoftSharingConfig) -> None:
        super().__init__(cfg=cfg)
        self._pairs: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def attach(self, ct: nn.Module, mr: nn.Module) -> None:
        """Record the corresponding parameter lists of both columns per depth."""
        for depth in self.cfg.resolved_depths(ct.depth_names):
            a = penalized_parameters(ct.stages[depth], exclude_norm_and_bias=self.cfg.exclude_norm_and_bias)
            b = penalized_parameters(mr.stages[depth], exclude_norm_and_bias=self.cfg.exclude_norm_and_bias)
            for (na, pa), (nb, pb) in zip(a, b, strict=True):
                if na != nb or pa.shape != pb.shape:
                    raise ValueError(f"sharing soft depth {depth!r}: parameter {na} {tuple(pa.shape)} has no counterpart of the same shape in the MR column")
                if pa is pb:
                    raise ValueError(f"sharing soft depth {depth!r}: parameters are already hard-shared; remove the depth from one of the mechanisms")
            self._pairs[depth] = ([p for _, p in a], [p for _, p in b])

    def penalties(self) -> dict[str, torch.Tensor]:
        """``lambda_d * sum ||theta_ct - theta_mr||_F^2`` per depth (scalar tensors with gradients)."""
        out = {}
        for depth, (a, b) in self._pairs.items():
            # Two foreach launches per depth; the norm's backward is masked at zero, so identical
            # columns give a zero gradient rather than NaN.
            norms = torch._foreach_norm(torch._foreach_sub(a, b))
            out[depth] = self.cfg.depths[depth] * torch.stack(norms).pow(2).sum()
        return out

    # no log_values: the trainer logs each depth's penalty as penalty/soft/<depth> (= lambda_d x squared distance)
