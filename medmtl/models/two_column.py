"""TwoColumnNet: a CT column and an MR column, sharing modules at named depths, one head per task.

Routing for unpaired data (DESIGN.md): without activation-mixing units each modality's batch runs
through its own column only, and penalties or tied parameters couple the columns. With mixing units
(cross-stitch) mixing two different patients' feature maps means nothing, so each modality's batch
runs through *both* columns in lock-step (dual path, about twice the forward compute), mixed after
the chosen stages, and is read out by its own column's head.
"""

from __future__ import annotations

import torch
from torch import nn

from medmtl.config import ExperimentConfig
from medmtl.models.column import Column
from medmtl.sharing import SharingMechanism, build_mechanism

__all__ = ["TwoColumnNet", "MODALITIES"]

MODALITIES: tuple[str, str] = ("ct", "mr")


class TwoColumnNet(nn.Module):
    """Two named-stage columns plus sharing mechanisms and one 1x1x1 head per modality.

    ``forward(x, modality)`` maps ``(B, in_channels, D, H, W)`` to logits ``(B, 1 + n_classes, D, H, W)``
    of that modality's label map (channel 0 is background).
    """

    def __init__(self, *, cfg: ExperimentConfig) -> None:
        super().__init__()
        self.columns = nn.ModuleDict({m: Column(cfg=cfg.model) for m in MODALITIES})
        c0 = cfg.model.channels[0]
        self.heads = nn.ModuleDict({m: nn.Conv3d(c0, 1 + len(cfg.data.labels[m]), kernel_size=1) for m in MODALITIES})
        self.sharing = nn.ModuleList()
        for mech_cfg in cfg.sharing:
            mech = build_mechanism(mech_cfg)
            mech.attach(self.columns["ct"], self.columns["mr"])
            self.sharing.append(mech)
        self.depth_names = self.columns["ct"].depth_names
        self._mixers: dict[str, list[SharingMechanism]] = {}
        for mech in self.sharing:
            for depth in mech.mix_depths():
                self._mixers.setdefault(depth, []).append(mech)

    @property
    def dual_path(self) -> bool:
        """True when every batch runs through both columns (a mechanism mixes activations)."""
        return bool(self._mixers)

    @property
    def divisor(self) -> int:
        """Each spatial input size must be a multiple of this."""
        return 2 ** (self.columns["ct"].levels - 1)

    def features(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Features of the last stage of ``modality``'s column, ``(B, channels[0], D, H, W)``."""
        if modality not in self.columns:
            raise KeyError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        if not self.dual_path:
            return self.columns[modality](x)
        h = {"ct": x, "mr": x}
        skips: dict[str, dict[str, torch.Tensor]] = {"ct": {}, "mr": {}}
        steps = {m: self.columns[m].stage_steps() for m in MODALITIES}
        for (name, f_ct), (_, f_mr) in zip(steps["ct"], steps["mr"]):
            h["ct"], h["mr"] = f_ct(h["ct"], skips["ct"]), f_mr(h["mr"], skips["mr"])
            for mech in self._mixers.get(name, ()):
                h["ct"], h["mr"] = mech.mix(name, h["ct"], h["mr"])
            if name.startswith("enc"):
                skips["ct"][name], skips["mr"][name] = h["ct"], h["mr"]
        return h[modality]

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Logits of ``modality``'s head for a batch of that modality."""
        return self.heads[modality](self.features(x, modality))

    def penalties(self) -> dict[str, torch.Tensor]:
        """All sharing penalties, keyed ``kind/depth``."""
        out = {}
        for mech in self.sharing:
            for depth, value in mech.penalties().items():
                out[f"{mech.kind}/{depth}"] = value
        return out

    def sharing_log_values(self) -> dict[str, float]:
        """Mixing coefficients and distances of every mechanism, for tracking."""
        out: dict[str, float] = {}
        for mech in self.sharing:
            out.update(mech.log_values())
        return out

    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups: network parameters (deduplicated; tied ones once) and each mechanism's own."""
        mech_params = {id(p) for mech in self.sharing for p in mech.parameters()}
        net = [p for p in self.parameters() if id(p) not in mech_params and p.requires_grad]
        groups = [{"params": net, "lr": base_lr, "weight_decay": weight_decay, "name": "network"}]
        for mech in self.sharing:
            groups.extend(mech.param_groups(base_lr))
        return groups

    def depth_parameters(self, depth: str) -> list[nn.Parameter]:
        """Parameters of stage ``depth`` in both columns (deduplicated when tied): GradNorm's ``W``."""
        seen: set[int] = set()
        out = []
        for m in MODALITIES:
            for p in self.columns[m].stages[depth].parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out
