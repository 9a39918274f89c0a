"""Deep supervision (nnU-Net; Isensee et al. 2021): auxiliary heads on coarser decoder stages.

Outputs are keyed ``"main"`` (the head at full resolution) and by decoder depth (``"dec1"``, ...,
at ``1/2**i`` of the patch). Weights halve with each level, ``w_main = 1``, ``w_dec_i = 1/2**i``, then
are normalized to sum to 1, as nnU-Net does. (nnU-Net also drops its lowest output; here the config
lists exactly the depths that get a head, so nothing is dropped.) Labels are brought to each output's
size with nearest-neighbour sampling, which keeps them integer class values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["deep_supervision_weights", "downsample_labels", "deep_supervision_loss"]


def deep_supervision_weights(depths: list[str]) -> dict[str, float]:
    """``{"main": w_0, "dec_i": w_i, ...}`` with ``w_i`` proportional to ``1/2**i``, summing to 1.

    ``depths`` are decoder depth names ``dec1``, ``dec2``, ... (validated by the config); an empty list
    gives ``{"main": 1.0}``, the plain loss.
    """
    raw = {"main": 1.0} | {d: 0.5 ** int(d.removeprefix("dec")) for d in depths}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def downsample_labels(y: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour resize of a label map ``(B, 1, D, H, W)`` to spatial ``size``, same dtype."""
    if tuple(y.shape[2:]) == tuple(size):
        return y
    # float for interpolate; class values are small integers, exact in float32
    return F.interpolate(y.float(), size=tuple(size), mode="nearest").to(y.dtype)


def deep_supervision_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    outputs: dict[str, torch.Tensor],
    y: torch.Tensor,
    weights: dict[str, float],
) -> torch.Tensor:
    """``sum_k weights[k] * loss_fn(outputs[k].float(), y resized to outputs[k])``.

    Args:
        loss_fn: e.g. MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``, called as ``loss_fn(logits, labels)``.
        outputs: ``TwoColumnNet.forward_with_aux`` output, key -> logits ``(B, 1 + n_classes, d, h, w)``
            (cast to float32, as the training step does with the main logits under autocast).
        y: labels ``(B, 1, D, H, W)`` at the main output's size.
        weights: key -> weight, e.g. ``TwoColumnNet.deep_supervision_weights``; every key of ``outputs``
            must have one.
    """
    missing = set(outputs) - set(weights)
    if missing:
        raise KeyError(f"no deep-supervision weight for outputs {sorted(missing)}; weights have {sorted(weights)}")
    terms = [weights[k] * loss_fn(out.float(), downsample_labels(y, out.shape[2:])) for k, out in outputs.items()]
    return torch.stack(terms).sum()
