"""MTLoRA (Agiza, Neseem & Reda, CVPR 2024): a task-agnostic low-rank module shared by the tasks plus
task-specific ones, on a shared backbone.

Here the tasks are the modalities: every convolution of the chosen depths gets
``W_m = W + (alpha_s / r_s) B_s A_s + (alpha / r) B_m A_m`` with one shared delta (rank ``shared_rank``,
trained by both modalities' losses) and one delta per modality (rank ``rank``). In the paper the backbone
is frozen (``freeze_base: true``, as ``medmtl adapt`` trains): the shared delta is then the only
parameter both modalities move, so it learns what they have in common while the task-specific deltas
learn what differs. With a trainable base the shared delta is a low-rank re-parametrisation of part of
``W``. Like ``lora``, the deltas merge into per-modality kernels for deployment.
"""

from __future__ import annotations

from torch import nn

from medmtl.config import MTLoRAConfig
from medmtl.modality import MODALITIES
from medmtl.sharing.lora import LoRAFamily
from medmtl.sharing.lora_layers import LoRAConv

__all__ = ["MTLoRA"]


class MTLoRA(LoRAFamily):
    """``kind: mtlora``: one shared delta and one delta per modality on every adapted kernel."""

    def __init__(self, *, cfg: MTLoRAConfig) -> None:
        super().__init__(cfg=cfg)

    def wrap(self, depth: str, path: str, conv: nn.Module) -> dict[str, nn.Module]:
        """Both columns' wrappers hold the same shared delta (one set of parameters) and their own."""
        shared = self.delta(conv, self.cfg.shared_rank, self.cfg.shared_alpha)
        return {m: LoRAConv(base=conv, deltas=[shared, self.delta(conv, self.cfg.rank, self.cfg.alpha)], dropout=self.cfg.dropout)
                for m in MODALITIES}
