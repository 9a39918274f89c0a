"""Mixture of LoRA experts: K low-rank experts per chosen depth and a learned per-sample router.

At each chosen depth, expert ``e`` is one low-rank delta on every convolution of the stage, and both
modalities share the experts and the shared column. Before the stage runs, a router
(:class:`~medmtl.sharing.routing.TopKRouter`) reads the globally pooled input of the stage (the deeper
feature map for a decoder stage), optionally with a learned modality embedding, and gives each sample
top-k gates that sum to 1; sample ``b`` then convolves with ``W + sum_e g_be (alpha / r) B_e A_e``
(one grouped convolution, see :class:`~medmtl.sharing.lora_layers.LoRAConv`).

The load-balancing loss ``balance_weight * L_bal`` (Switch/GShard form, :func:`~medmtl.sharing.routing.balance_loss`)
of each depth is computed on each forward batch (one modality's batch: the step forwards CT and MR
separately) and added to that task's loss before its backward pass (:meth:`forward_losses`). So every
modality is pushed to use all experts; specialisation shows in the gate values and the per-modality
usage, which :meth:`log_values` reports with the router entropy and the balance loss, averaged over the
training forwards since the previous read. With a mixing unit (dual path), "modality" means the column.

Not mergeable: the kernel depends on the input, so a deployed model keeps the router (the extra cost is
the router and the per-sample kernel sums; the convolutions cost what the base column's cost).
"""

from __future__ import annotations

import torch
from torch import nn

from medmtl.config import MixtureOfLoRAConfig
from medmtl.modality import MODALITIES
from medmtl.sharing.lora import LoRAFamily
from medmtl.sharing.lora_layers import LoRAConv
from medmtl.sharing.routing import Routing, TopKRouter, balance_loss, router_entropy

__all__ = ["MixtureOfLoRA"]


def _in_channels(stage: nn.Module) -> int:
    """Channels of a stage's first input (its first convolution's input: the upsampling one in a decoder)."""
    first = next(m for m in stage.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)))
    return first.in_channels


class MixtureOfLoRA(LoRAFamily):
    """``kind: mixture_of_lora``: ``num_experts`` deltas per adapted kernel, a :class:`TopKRouter` per depth."""

    def __init__(self, *, cfg: MixtureOfLoRAConfig) -> None:
        super().__init__(cfg=cfg)
        self.routers = nn.ModuleDict()
        self._routing: dict[str, Routing | None] = {}
        self._pending: dict[str, torch.Tensor] = {}  # "depth/modality" -> weighted balance loss of the last forward
        self._stats: dict[str, dict[str, torch.Tensor]] = {}

    def attach(self, ct: nn.Module, mr: nn.Module) -> None:
        """Tie and wrap (one wrapper shared by both columns), then a router and hooks per depth and column."""
        super().attach(ct, mr)
        for depth in self.cfg.adapter_depths(ct.depth_names):
            self.routers[depth] = TopKRouter(in_channels=_in_channels(ct.stages[depth]), num_experts=self.cfg.num_experts,
                                             top_k=self.cfg.top_k, num_modalities=len(MODALITIES) if self.cfg.modality_embedding else 0,
                                             embedding_dim=self.cfg.embedding_dim)
            self._routing[depth] = None
            for index, (modality, column) in enumerate(self._columns.items()):
                column.stages[depth].register_forward_pre_hook(self._route_hook(depth, modality, index))
                column.stages[depth].register_forward_hook(self._clear_hook(depth))

    def wrap(self, depth: str, path: str, conv: nn.Module) -> dict[str, nn.Module]:
        """One wrapper for both columns: the experts and the shared kernel, gated by this depth's router."""
        experts = [self.delta(conv, self.cfg.rank, self.cfg.alpha) for _ in range(self.cfg.num_experts)]
        wrapper = LoRAConv(base=conv, deltas=experts, dropout=self.cfg.dropout, gates=lambda d=depth: self._gates(d))
        return {m: wrapper for m in MODALITIES}

    def _gates(self, depth: str) -> torch.Tensor:
        routing = self._routing[depth]
        if routing is None:
            raise RuntimeError(f"mixture_of_lora: the convolutions of {depth!r} ran outside their stage (no routing)")
        return routing.gates

    def _route_hook(self, depth: str, modality: str, index: int):
        def hook(stage: nn.Module, args: tuple) -> None:
            routing = self.routers[depth](args[0], index if self.cfg.modality_embedding else None)
            self._routing[depth] = routing
            if self.training and torch.is_grad_enabled():
                loss = balance_loss(routing.probs, routing.indices, self.cfg.num_experts)
                self._pending[f"{depth}/{modality}"] = self.cfg.balance_weight * loss
                self._record(depth, modality, routing, loss)
        return hook

    def _clear_hook(self, depth: str):
        def hook(stage: nn.Module, args: tuple, output) -> None:
            self._routing[depth] = None
        return hook

    @torch.no_grad()
    def _record(self, depth: str, modality: str, routing: Routing, loss: torch.Tensor) -> None:
        s = self._stats.setdefault(f"{depth}/{modality}", {
            "usage": torch.zeros(self.cfg.num_experts, dtype=torch.float64), "entropy": torch.zeros((), dtype=torch.float64),
            "balance": torch.zeros((), dtype=torch.float64), "n": torch.zeros((), dtype=torch.float64)})
        s["usage"] += torch.bincount(routing.indices.reshape(-1).cpu(), minlength=self.cfg.num_experts).double() / routing.indices.numel()
        s["entropy"] += float(router_entropy(routing.probs))
        s["balance"] += float(loss)
        s["n"] += 1

    def forward_losses(self) -> dict[str, torch.Tensor]:
        """The weighted balance losses of the forward pass just run, keyed ``depth/modality``; cleared on read."""
        out, self._pending = self._pending, {}
        return out

    def log_values(self) -> dict[str, float]:
        """Per depth and modality, means over the training forwards since the last read: ``usage/e<i>``
        (fraction of top-k assignments to expert i), ``entropy`` (nats) and ``balance_loss`` (unweighted)."""
        out: dict[str, float] = {}
        for key, s in self._stats.items():
            n = float(s["n"])
            for e, u in enumerate((s["usage"] / n).tolist()):
                out[f"{self.kind}/{key}/usage/e{e}"] = u
            out[f"{self.kind}/{key}/entropy"] = float(s["entropy"]) / n
            out[f"{self.kind}/{key}/balance_loss"] = float(s["balance"]) / n
        self._stats = {}
        return out
