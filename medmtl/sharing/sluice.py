"""Sluice units (Ruder, Bingel, Augenstein & Søgaard 2019, "Latent Multi-task Architecture Learning", AAAI).

Three parts, each learned:

* **alpha** per chosen depth ``d``: each column's output ``(B, C, D, H, W)`` is split along channels
  into ``M`` subspaces of ``C/M`` channels, and a ``(2M, 2M)`` matrix mixes all ``2M`` subspaces of both
  columns: ``[ct_1..ct_M, mr_1..mr_M]' = alpha_d [ct_1..ct_M, mr_1..mr_M]`` (one scalar per pair of
  subspaces, as in the paper). It starts at ``kron(init, I_M)``: subspace ``m`` of a column takes
  ``init`` of subspace ``m`` of either column. With ``M = 1`` this is a scalar cross-stitch unit.
* **beta** per modality: the head reads ``sum_l beta_l h_l`` over chosen layers ``l`` of its own column
  (after mixing). Plain learned weights as in the authors' code (``LayerStitchLayer``), or a softmax over
  learned logits (``beta_mode``). Only layers of the head's input shape are mixed (``channels[0]`` at
  full resolution: ``enc0`` and ``dec0``), so no resampling or channel projection is added to the
  paper's model; the config refuses other layers.
* **orthogonality penalty** per depth: ``w * sum_columns sum_(i<j) ||G_i^T G_j||_F^2`` where the columns of
  ``G_m`` (shape ``(C_in * k^3, C/M)``) are the filters that write subspace ``m`` (each output convolution
  of the stage, see :meth:`~medmtl.models.column.Stage.output_convs`). The authors' code constrains the
  layer's weight matrices in the same way. We do not constrain activations: with unpaired data the
  trainer back-propagates each task's forward graph before it reads :meth:`penalties`, so a penalty on
  activations would need those graphs kept alive; a penalty on weights costs one small Gram matrix per
  convolution and does not depend on batch or patch size.

Unpaired data: like cross-stitch, each batch runs through both columns (dual path, about 2x forward).
"""

from __future__ import annotations

import torch
from torch import nn

from medmtl.config import SluiceConfig
from medmtl.modality import MODALITIES
from medmtl.sharing.base import SharingMechanism

__all__ = ["Sluice", "subspace_orthogonality"]

def subspace_orthogonality(weight: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """``sum_(i<j) ||G_i^T G_j||_F^2`` for a convolution weight ``(C_out, C_in, k, k, k)``.

    ``G_m`` holds the flattened filters of output channels ``[m C/M, (m+1) C/M)`` as columns, so
    ``G_i^T G_j`` is block ``(i, j)`` of the filters' Gram matrix ``W W^T`` ``(C_out, C_out)``; the
    off-diagonal blocks are summed once per pair.
    """
    w = weight.reshape(weight.shape[0], -1)
    gram = w @ w.T
    size = weight.shape[0] // num_subspaces
    same = torch.block_diag(*[torch.ones(size, size, dtype=w.dtype, device=w.device)] * num_subspaces)
    return 0.5 * (gram.square() * (1 - same)).sum()


class Sluice(SharingMechanism):
    """Sluice units at the configured depths: alpha ``(2M, 2M)`` per depth, beta ``(L,)`` per modality."""


    def __init__(self, *, cfg: SluiceConfig) -> None:
        super().__init__(cfg=cfg)
        self.alpha = nn.ParameterDict()
        self.beta = nn.ParameterDict()
        # depth -> column -> output convolutions; plain dict so the columns' modules are not registered twice
        self._convs: dict[str, dict[str, list[nn.Conv3d]]] = {}

    def attach(self, ct: nn.Module, mr: nn.Module) -> None:
        """Create alpha per depth and beta per modality; record the convolutions the penalty constrains."""
        m = self.cfg.num_subspaces
        init = torch.kron(torch.tensor(self.cfg.init, dtype=torch.float32), torch.eye(m))
        for depth in self.cfg.depths:
            self.alpha[depth] = nn.Parameter(init.clone())
            self._convs[depth] = {"ct": ct.stages[depth].output_convs(), "mr": mr.stages[depth].output_convs()}
        beta = torch.tensor(list(self.cfg.beta_depths.values()), dtype=torch.float32)
        if self.cfg.beta_mode == "softmax":
            beta = beta.log()  # softmax(log b) = b / sum(b): starts at the configured (normalized) weights
        for modality in MODALITIES:
            self.beta[modality] = nn.Parameter(beta.clone())

    def exclusive_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Each modality's beta: only that modality's head reads it."""
        return {m: [self.beta[m]] for m in MODALITIES}

    def mix_depths(self) -> list[str]:
        """The configured alpha depths."""
        return list(self.cfg.depths)

    def mix(self, depth: str, x_ct: torch.Tensor, x_mr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix all subspaces of both columns; inputs and outputs ``(B, C, D, H, W)``, ``C`` divisible by ``M``."""
        m = self.cfg.num_subspaces
        b = x_ct.shape[0]
        # (B, C, ...) -> (B, M, C/M * D*H*W): subspace m is channels [m C/M, (m+1) C/M)
        stacked = torch.cat([x_ct.reshape(b, m, -1), x_mr.reshape(b, m, -1)], dim=1)
        mixed = torch.matmul(self.alpha[depth].to(stacked.dtype), stacked)  # (B, 2M, C/M * D*H*W)
        return mixed[:, :m].reshape(x_ct.shape), mixed[:, m:].reshape(x_mr.shape)

    def head_input_depths(self) -> list[str]:
        """The beta layers, in config order."""
        return list(self.cfg.beta_depths)

    def beta_weights(self, modality: str) -> torch.Tensor:
        """Effective beta weights ``(L,)`` of ``modality`` (after the softmax in softmax mode)."""
        b = self.beta[modality]
        return torch.softmax(b, dim=0) if self.cfg.beta_mode == "softmax" else b

    def head_input(self, modality: str, layers: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum_l beta_l h_l`` over the beta layers of ``modality``'s column, each ``(B, C0, D, H, W)``."""
        w = self.beta_weights(modality)
        out = None
        for i, depth in enumerate(self.cfg.beta_depths):
            term = w[i].to(layers[depth].dtype) * layers[depth]
            out = term if out is None else out + term
        return out

    def _orthogonality(self, depth: str) -> dict[str, torch.Tensor]:
        per_column = {}
        seen: set[int] = set()
        for column in MODALITIES:
            terms = []
            for conv in self._convs[depth][column]:
                if id(conv.weight) not in seen:  # a tied (hard-shared) convolution counts once
                    seen.add(id(conv.weight))
                    terms.append(subspace_orthogonality(conv.weight, self.cfg.num_subspaces))
            if terms:
                per_column[column] = torch.stack(terms).sum()
        return per_column

    def penalties(self) -> dict[str, torch.Tensor]:
        """``orthogonality_weight * sum_columns sum_(i<j) ||G_i^T G_j||_F^2`` per depth; none with ``M = 1``."""
        if self.cfg.num_subspaces < 2 or self.cfg.orthogonality_weight == 0:
            return {}
        return {d: self.cfg.orthogonality_weight * torch.stack(list(self._orthogonality(d).values())).sum()
                for d in self.cfg.depths}

    def param_groups(self, base_lr: float) -> list[dict]:
        """Alpha and beta at ``lr_multiplier * base_lr``, without weight decay (it would pull them to 0)."""
        return [{"params": list(self.alpha.values()) + list(self.beta.values()), "lr": base_lr * self.cfg.lr_multiplier,
                 "weight_decay": 0.0, "name": "sharing/sluice"}]

    def log_values(self) -> dict[str, float]:
        """Alpha entries (``ct0<-mr1`` = weight of MR subspace 1 in CT subspace 0), beta per modality, and the
        unweighted orthogonality term per depth and column."""
        m = self.cfg.num_subspaces
        tags = [f"{c}{i}" for c in MODALITIES for i in range(m)]
        out: dict[str, float] = {}
        with torch.no_grad():
            for depth, a in self.alpha.items():
                for i, row in enumerate(tags):
                    for j, col in enumerate(tags):
                        out[f"sluice/{depth}/alpha/{row}<-{col}"] = float(a[i, j])
                if m > 1:
                    for column, value in self._orthogonality(depth).items():
                        out[f"sluice/{depth}/orthogonality/{column}"] = float(value)
            for modality in MODALITIES:
                for depth, w in zip(self.cfg.beta_depths, self.beta_weights(modality)):
                    out[f"sluice/beta/{modality}/{depth}"] = float(w)
        return out
