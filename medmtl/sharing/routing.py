"""A per-sample top-k router and the Switch/GShard load-balancing loss, for the mixture of LoRA experts.

Router (Shazeer et al. 2017; Fedus et al. 2022, "Switch Transformers"): the input of a depth
``(B, C, D, H, W)`` is pooled globally to ``(B, C)``, optionally concatenated with a learned embedding of
the sample's modality, and a linear layer gives logits ``(B, K)``; ``p = softmax(logits)``. The ``k``
largest probabilities are kept and renormalised, ``g_b = p_b * 1[top-k] / sum_topk p_b``, so every
sample's gates sum to 1 over its ``k`` experts (zero elsewhere).

Balance loss (Switch, eq. 4; GShard's form for ``k > 1``)::

    L_bal = K * sum_i f_i * P_i,   f_i = #{(b, j): expert i is sample b's j-th choice} / (B k),
                                   P_i = mean_b p_{b,i}

``f`` (fractions of assignments, no gradient) and ``P`` (mean router probability) both sum to 1;
``L_bal = 1`` when routing is uniform and grows to ``K`` when every sample goes to one expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Routing", "TopKRouter", "balance_loss", "router_entropy"]


@dataclass
class Routing:
    """One routing decision for a batch: ``probs`` and ``gates`` ``(B, K)``, ``indices`` ``(B, k)``."""

    probs: torch.Tensor
    gates: torch.Tensor
    indices: torch.Tensor


def balance_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``K * sum_i f_i P_i`` for router probabilities ``(B, K)`` and chosen experts ``(B, k)`` (see module doc)."""
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(0, indices.reshape(-1), torch.ones(indices.numel(), dtype=probs.dtype, device=probs.device))
    f = counts / indices.numel()
    return num_experts * (f * probs.mean(dim=0)).sum()


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ``-sum_i p_i log p_i`` (nats; ``log K`` = undecided, 0 = one expert)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=1).mean()


class TopKRouter(nn.Module):
    """Linear router over the globally pooled input of a depth, with an optional modality embedding.

    Args:
        in_channels: channels ``C`` of the routed depth's input.
        num_experts: ``K``.
        top_k: experts per sample, ``1 <= k <= K``.
        num_modalities: size of the modality embedding table (0 = no embedding).
        embedding_dim: length of the modality embedding.
    """

    def __init__(self, *, in_channels: int, num_experts: int, top_k: int, num_modalities: int = 0, embedding_dim: int = 4) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.embedding = nn.Embedding(num_modalities, embedding_dim) if num_modalities else None
        self.linear = nn.Linear(in_channels + (embedding_dim if num_modalities else 0), num_experts)
        # small start: the router begins near uniform, so every expert gets samples (and gradient) early
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, modality: int | None = None) -> Routing:
        """Route a batch ``(B, C, D, H, W)`` (of modality index ``modality`` when the router embeds it)."""
        with torch.autocast(device_type=x.device.type, enabled=False):  # routing in fp32 under any precision
            feats = x.float().mean(dim=tuple(range(2, x.dim())))  # (B, C)
            if self.embedding is not None:
                if modality is None:
                    raise ValueError("this router embeds the modality: pass its index")
                idx = torch.full((x.shape[0],), modality, dtype=torch.long, device=x.device)
                feats = torch.cat([feats, self.embedding(idx)], dim=1)
            probs = torch.softmax(self.linear(feats), dim=1)
        top, indices = probs.topk(self.top_k, dim=1)
        gates = torch.zeros_like(probs).scatter(1, indices, top / top.sum(dim=1, keepdim=True))
        return Routing(probs=probs, gates=gates, indices=indices)
