"""Fold low-rank deltas into per-modality kernels for deployment, and map a trained model onto an adapter net.

:func:`merge_adapters` turns a net with ``lora`` or ``mtlora`` sharing into a plain two-column net (those
sections removed from the config) whose CT and MR kernels are ``W + sum Delta W_m``: the same outputs
within fp32 rounding, no adapter left at inference. A ``mixture_of_lora`` section stays as it is (its
kernel depends on the input and cannot be folded).

:func:`base_state_for_adaptation` reads a trained (plain) net's ``source`` column and head as the base of an
adapter net in which both columns use that column: what ``medmtl adapt`` starts from.
"""

from __future__ import annotations

import re

import torch

from medmtl.config import ExperimentConfig
from medmtl.modality import MODALITIES
from medmtl.models.two_column import TwoColumnNet
from medmtl.sharing.lora_layers import LoRAConv

__all__ = ["merge_adapters", "plain_state_dict", "base_state_for_adaptation", "parameter_counts"]


def plain_state_dict(net: TwoColumnNet, keep_mechanisms: list[int]) -> dict[str, torch.Tensor]:
    """``net``'s state with every ungated :class:`LoRAConv` folded into a plain convolution's
    ``weight``/``bias``; ``sharing.<i>`` entries renumbered to the positions of ``keep_mechanisms``."""
    state = net.state_dict()
    out: dict[str, torch.Tensor] = {}
    wrappers = {name: m for name, m in net.named_modules(remove_duplicate=False) if isinstance(m, LoRAConv) and not m.routed}
    for name, wrapper in wrappers.items():
        plain = wrapper.merged()
        out[f"{name}.weight"] = plain.weight.detach().clone()
        if plain.bias is not None:
            out[f"{name}.bias"] = plain.bias.detach().clone()
    renumber = {old: new for new, old in enumerate(keep_mechanisms)}
    for key, value in state.items():
        if any(key.startswith(f"{name}.") for name in wrappers):
            continue
        m = re.match(r"sharing\.(\d+)\.(.*)", key)
        if m:
            if int(m.group(1)) not in renumber:
                continue
            key = f"sharing.{renumber[int(m.group(1))]}.{m.group(2)}"
        out[key] = value
    return out


def merge_adapters(net: TwoColumnNet, cfg: ExperimentConfig) -> tuple[TwoColumnNet, ExperimentConfig]:
    """A plain net and config with the mergeable deltas folded in; ``(net, cfg)`` unchanged when there are none."""
    keep = [i for i, mech in enumerate(net.sharing) if not mech.merges_into_kernels]
    if len(keep) == len(net.sharing):
        return net, cfg
    plain_cfg = cfg.model_copy(deep=True)
    plain_cfg.sharing = [cfg.sharing[i] for i in keep]
    plain = TwoColumnNet(cfg=plain_cfg)
    plain.load_state_dict(plain_state_dict(net, keep), strict=True)
    device = next(net.parameters()).device
    return plain.to(device).train(net.training), plain_cfg


def base_state_for_adaptation(adapt_net: TwoColumnNet, source_state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Entries of ``adapt_net``'s state taken from a plain net's ``source`` column, head and auxiliary heads.

    Every modality's column, normalization layers and heads start as ``source``'s (the adapter deltas
    keep their initialisation: zero ``B``, so the adapted model starts as the source modality's model).
    """
    out: dict[str, torch.Tensor] = {}
    for key in adapt_net.state_dict():
        if ".deltas." in key or key.startswith("sharing."):
            continue
        src = key.replace(".base.", ".")
        for m in MODALITIES:
            src = re.sub(rf"^(columns|heads|aux_heads)\.{m}\.", rf"\1.{source}.", src)
        if src not in source_state:
            raise KeyError(f"the source model has no {src!r}: it was built with another model section")
        out[key] = source_state[src]
    return out


def parameter_counts(net: torch.nn.Module) -> dict[str, int]:
    """``{"total", "trainable"}`` parameter counts, tied parameters counted once."""
    params = {id(p): p for p in net.parameters()}.values()
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}
