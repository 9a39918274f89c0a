"""Modality LoRA: one shared column, per-modality low-rank deltas on the kernels of chosen depths.

``W_m = W + (alpha / r) B_m A_m`` for every convolution (``Conv3d`` and the decoders' ``ConvTranspose3d``)
of the chosen depths, ``B_m`` zero at the start so training begins from the shared model (Hu et al. 2022,
applied per modality instead of per task). Every other parameter is one set used by both columns, except
the normalization layers, which stay per modality when ``modality_norms`` is set (as in shared kernels).
The deltas merge into per-modality kernels for deployment (:func:`~medmtl.models.merge.merge_adapters`).

:class:`LoRAFamily` holds what ``lora``, ``mtlora`` and ``mixture_of_lora`` share: tying the columns,
wrapping the convolutions, freezing the base (``freeze_base``, used by ``medmtl adapt``).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.normalization import GroupNorm, LayerNorm

from medmtl.config import LoRAConfig
from medmtl.modality import MODALITIES
from medmtl.sharing.base import SharingMechanism
from medmtl.sharing.lora_layers import CONV_TYPES, LoRAConv, LowRankDelta, adapter_parameters

__all__ = ["LoRAFamily", "ModalityLoRA", "tie_columns", "set_submodule"]

_NORM_TYPES = (_NormBase, GroupNorm, LayerNorm)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` under ``root``."""
    parent_name, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def tie_columns(ct: nn.Module, mr: nn.Module, *, modality_norms: bool) -> None:
    """Make every parameterised leaf of the MR column the CT column's (norms too unless ``modality_norms``)."""
    src = dict(ct.named_modules())
    for name, module in list(mr.named_modules()):
        if next(module.children(), None) is not None or not any(True for _ in module.parameters(recurse=False)):
            continue
        if modality_norms and isinstance(module, _NORM_TYPES):
            continue
        set_submodule(mr, name, src[name])


class LoRAFamily(SharingMechanism):
    """Shared column plus low-rank deltas; subclasses say which deltas each column's convolution gets."""

    def attach(self, ct: nn.Module, mr: nn.Module) -> None:
        """Tie the columns, then wrap every convolution of the chosen depths in both columns."""
        tie_columns(ct, mr, modality_norms=self.cfg.modality_norms)
        self._columns = dict(zip(MODALITIES, (ct, mr)))
        for depth in self.cfg.adapter_depths(ct.depth_names):
            stage = ct.stages[depth]
            for path, conv in [(n, m) for n, m in stage.named_modules() if isinstance(m, CONV_TYPES)]:
                wrappers = self.wrap(depth, path, conv)
                for modality, column in self._columns.items():
                    set_submodule(column.stages[depth], path, wrappers[modality])

    def wrap(self, depth: str, path: str, conv: nn.Module) -> dict[str, nn.Module]:
        """The wrapper of the shared convolution ``conv`` for each column (may be one object for both)."""
        raise NotImplementedError

    def delta(self, conv: nn.Module, rank: int, alpha: float) -> LowRankDelta:
        """A new delta for ``conv``; the rank is capped at the kernel matrix's rank (e.g. 1 for a 1x1x1 from one channel)."""
        rows, cols = conv.weight.shape[0], conv.weight[0].numel()
        r = min(rank, rows, cols)
        return LowRankDelta(weight_shape=tuple(conv.weight.shape), rank=r, alpha=alpha * r / rank)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The deltas (and routers) in both columns and in this module, each once."""
        params = {id(p): p for col in self._columns.values() for p in adapter_parameters(col)}
        params.update({id(p): p for p in self.parameters()})
        return list(params.values())



class ModalityLoRA(LoRAFamily):
    """``kind: lora``: each modality in ``cfg.modalities`` gets its own delta on every adapted kernel."""

    def __init__(self, *, cfg: LoRAConfig) -> None:
        super().__init__(cfg=cfg)

    def wrap(self, depth: str, path: str, conv: nn.Module) -> dict[str, nn.Module]:
        """One wrapper per column; a modality outside ``cfg.modalities`` keeps the shared kernel as it is."""
        return {m: LoRAConv(base=conv, deltas=[self.delta(conv, self.cfg.rank, self.cfg.alpha)], dropout=self.cfg.dropout)
                if m in self.cfg.modalities else conv for m in MODALITIES}
