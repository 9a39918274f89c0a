"""A 3D encoder-decoder column whose stages are addressable by name.

MONAI's ``UNet`` nests ``Sequential(down, SkipConnection(sub), up)`` and its stages cannot be tapped,
so the column is built here from MONAI blocks (``ResidualUnit``, ``Convolution``) as a flat
``ModuleDict`` of named stages::

    enc0 -> enc1 -> ... -> bottleneck -> ... -> dec1 -> dec0 -> head
    (dec_i works at the resolution of enc_i and receives enc_i's output as its skip connection)

Sharing mechanisms address these names (``enc0``, ``bottleneck``, ``dec0``, ...). Shapes: input
``(B, in_channels, D, H, W)`` with every spatial size divisible by ``2 ** (len(channels) - 1)``; the output of
``enc_i`` and ``dec_i`` has ``channels[i]`` channels at ``1 / 2**i`` of the input size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from medmtl.config import ModelConfig

__all__ = ["Column", "Stage", "StageKind", "norm_spec"]

#: ``same``: refine at the input resolution (enc0); ``down``: stride-2 downsampling (enc_i, bottleneck);
#: ``decoder``: transposed-convolution upsampling, concatenation of the skip connection, refinement
StageKind = Literal["same", "down", "decoder"]


def norm_spec(norm: str) -> tuple | str:
    """MONAI norm argument for a config norm name (group norm uses up to 8 groups)."""
    return {"instance": ("instance", {"affine": True}), "batch": "batch", "group": ("group", {"num_groups": 4})}[norm]


def _unit(cfg: ModelConfig, in_channels: int, out_channels: int, strides: int) -> nn.Module:
    if cfg.num_res_units > 0:
        return ResidualUnit(
            spatial_dims=3, in_channels=in_channels, out_channels=out_channels, strides=strides, kernel_size=3,
            subunits=cfg.num_res_units + 1, norm=norm_spec(cfg.norm), dropout=cfg.dropout or None, act="PRELU",
        )
    return Convolution(
        spatial_dims=3, in_channels=in_channels, out_channels=out_channels, strides=strides, kernel_size=3,
        norm=norm_spec(cfg.norm), dropout=cfg.dropout or None, act="PRELU",
    )


class Stage(nn.Module):
    """One named stage of a column.

    Encoder stages downsample (stride 2, except ``enc0``) and refine; decoder stages upsample the
    deeper feature map with a transposed convolution, concatenate the skip connection and refine.
    """

    def __init__(self, *, cfg: ModelConfig, in_channels: int, out_channels: int, kind: StageKind,
                 skip_channels: int = 0) -> None:
        super().__init__()
        self.kind = kind
        if kind == "decoder":
            self.up = Convolution(
                spatial_dims=3, in_channels=in_channels, out_channels=out_channels, strides=2, kernel_size=3,
                norm=norm_spec(cfg.norm), act="PRELU", is_transposed=True,
            )
            self.block = _unit(cfg, out_channels + skip_channels, out_channels, strides=1)
        else:
            self.block = _unit(cfg, in_channels, out_channels, strides=2 if kind == "down" else 1)

    def output_convs(self) -> list[nn.Conv3d]:
        """The convolutions whose filters write the stage's output channels (channel ``c`` of the output
        depends on filter ``c`` of each, through channel-wise norm and activation only).

        A residual unit has two: the last convolution of its main path and its residual projection
        (when that is a convolution). Sluice's orthogonality penalty splits these filters into subspaces.
        """
        if isinstance(self.block, ResidualUnit):
            convs = [m for m in self.block.conv.modules() if isinstance(m, nn.Conv3d)][-1:]
            if isinstance(self.block.residual, nn.Conv3d):
                convs.append(self.block.residual)
            return convs
        return [self.block.conv]

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, in_channels, ...) -> (B, out_channels, ...)``; decoder stages take the skip tensor at the output size."""
        if self.kind == "decoder":
            return self.block(torch.cat([self.up(x), skip], dim=1))
        return self.block(x)


class Column(nn.Module):
    """A 3D encoder-decoder with named stages (no head; heads belong to the two-column net).

    Args:
        cfg: the model section of the config (channels per level, residual units, norm, dropout).
    """

    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        ch = list(cfg.channels)
        k = len(ch)
        self.depth_names: list[str] = cfg.depth_names
        self.stages = nn.ModuleDict()
        self.stages["enc0"] = Stage(cfg=cfg, in_channels=cfg.in_channels, out_channels=ch[0], kind="same")
        for i in range(1, k - 1):
            self.stages[f"enc{i}"] = Stage(cfg=cfg, in_channels=ch[i - 1], out_channels=ch[i], kind="down")
        self.stages["bottleneck"] = Stage(cfg=cfg, in_channels=ch[k - 2], out_channels=ch[k - 1], kind="down")
        for i in reversed(range(k - 1)):
            self.stages[f"dec{i}"] = Stage(cfg=cfg, in_channels=ch[i + 1], out_channels=ch[i], kind="decoder",
                                           skip_channels=ch[i])

    def stage_steps(self) -> Iterator[tuple[str, Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]]]:
        """Yield ``(depth_name, fn)`` in execution order, ``fn(x, skips) -> y``.

        Encoder outputs are recorded in ``skips`` by the caller; this lets a two-column net run both
        columns in lock-step and mix their activations after any named stage.
        """
        for name in self.depth_names:
            stage = self.stages[name]
            if name.startswith("dec"):
                level = name[3:]
                yield name, (lambda x, skips, s=stage, lv=level: s(x, skips[f"enc{lv}"]))
            else:
                yield name, (lambda x, skips, s=stage: s(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D, H, W) -> (B, channels[0], D, H, W)`` features for a head."""
        skips: dict[str, torch.Tensor] = {}
        for name, fn in self.stage_steps():
            x = fn(x, skips)
            if name.startswith("enc"):
                skips[name] = x
        return x
