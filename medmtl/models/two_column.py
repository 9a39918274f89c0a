"""TwoColumnNet: a CT column and an MR column, sharing modules at named depths, one head per task.

Routing for unpaired data (DESIGN.md): without activation-mixing units each modality's batch runs
through its own column only, and penalties or tied parameters couple the columns. With mixing units
(cross-stitch, sluice) mixing two different patients' feature maps means nothing, so each modality's
batch runs through *both* columns in lock-step (dual path: about twice the forward compute up to the
last mixing depth; the other column's later stages are skipped), mixed after the chosen stages, and
is read out by its own column's head. A mechanism may also replace a head's input by a mix of layers
of its column (sluice's beta). Optional deep supervision adds auxiliary heads on coarser decoder
stages, read through :meth:`TwoColumnNet.forward_with_aux`.
"""

from __future__ import annotations

import torch
from torch import nn

from medmtl.config import ExperimentConfig
from medmtl.modality import MODALITIES
from medmtl.models.column import Column
from medmtl.models.deep_supervision import deep_supervision_weights
from medmtl.sharing import SharingMechanism, build_mechanism

__all__ = ["TwoColumnNet"]


class TwoColumnNet(nn.Module):
    """Two named-stage columns plus sharing mechanisms and one 1x1x1 head per modality.

    ``forward(x, modality)`` maps ``(B, in_channels, D, H, W)`` to logits ``(B, 1 + n_classes, D, H, W)``
    of that modality's label map (channel 0 is background). ``forward_with_aux`` adds the auxiliary
    heads' logits of deep supervision.
    """

    def __init__(self, *, cfg: ExperimentConfig) -> None:
        super().__init__()
        self.columns = nn.ModuleDict({m: Column(cfg=cfg.model) for m in MODALITIES})
        ch = cfg.model.channels
        n_out = {m: 1 + len(cfg.data.labels[m]) for m in MODALITIES}
        self.heads = nn.ModuleDict({m: nn.Conv3d(ch[0], n_out[m], kernel_size=1) for m in MODALITIES})
        # deep supervision: one 1x1x1 head per modality on each listed decoder depth dec_i (channels[i])
        self.aux_depths: list[str] = list(cfg.model.deep_supervision_depths)
        self.aux_heads = nn.ModuleDict({
            m: nn.ModuleDict({d: nn.Conv3d(ch[int(d.removeprefix("dec"))], n_out[m], kernel_size=1) for d in self.aux_depths})
            for m in MODALITIES
        })
        self.deep_supervision_weights: dict[str, float] = deep_supervision_weights(self.aux_depths)
        self.sharing = nn.ModuleList()
        for mech_cfg in cfg.sharing:
            mech = build_mechanism(mech_cfg)
            mech.attach(self.columns["ct"], self.columns["mr"])
            self.sharing.append(mech)
        if any(mech.freezes_base for mech in self.sharing):
            # adaptation: only the adapters train; the column, norms and heads stay as loaded
            keep = {id(p) for mech in self.sharing for p in mech.adapter_parameters()}
            for p in self.parameters():
                p.requires_grad_(id(p) in keep)
        self.depth_names = self.columns["ct"].depth_names
        self._mixers: dict[str, list[SharingMechanism]] = {}
        for mech in self.sharing:
            for depth in mech.mix_depths():
                self._mixers.setdefault(depth, []).append(mech)
        # index of the last stage after which a unit mixes (-1: single path)
        self._last_mix = max((self.depth_names.index(d) for d in self._mixers), default=-1)
        # at most one (the config refuses a second): it replaces each head's input by a mix of layers
        self._head_mixer = next((mech for mech in self.sharing if mech.head_input_depths()), None)

    @property
    def dual_path(self) -> bool:
        """True when every batch runs through both columns (a mechanism mixes activations)."""
        return bool(self._mixers)

    def _run(self, x: torch.Tensor, modality: str, taps: set[str]) -> dict[str, torch.Tensor]:
        """Outputs of the stages in ``taps`` of ``modality``'s column (after mixing) for a batch of that modality.

        Single path: only that column runs. Dual path: both columns run in lock-step on ``x`` and the
        mixing units act after their depths; after the last mixing depth only ``modality``'s column
        goes on (the other column's later stages could not reach this readout).
        """
        if modality not in self.columns:
            raise KeyError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        steps = {m: [fn for _, fn in self.columns[m].stage_steps()] for m in MODALITIES}
        h = {m: x for m in MODALITIES}
        skips: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MODALITIES}
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.depth_names):
            active = MODALITIES if i <= self._last_mix else (modality,)
            for m in active:
                h[m] = steps[m][i](h[m], skips[m])
            for mech in self._mixers.get(name, ()):
                h["ct"], h["mr"] = mech.mix(name, h["ct"], h["mr"])
            if name.startswith("enc"):
                for m in active:
                    skips[m][name] = h[m]
            if name in taps:
                out[name] = h[modality]
        return out

    def _head_input(self, layers: dict[str, torch.Tensor], modality: str) -> torch.Tensor:
        if self._head_mixer is None:
            return layers[self.depth_names[-1]]
        return self._head_mixer.head_input(modality, {d: layers[d] for d in self._head_mixer.head_input_depths()})

    def _taps(self, aux: bool) -> set[str]:
        taps = {self.depth_names[-1]}
        if self._head_mixer is not None:
            taps.update(self._head_mixer.head_input_depths())
        if aux:
            taps.update(self.aux_depths)
        return taps

    def features(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Input of ``modality``'s head, ``(B, channels[0], D, H, W)``: the last stage's output, or the
        mechanism's mix of layers (sluice beta)."""
        return self._head_input(self._run(x, modality, self._taps(aux=False)), modality)

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Logits of ``modality``'s head for a batch of that modality."""
        return self.heads[modality](self.features(x, modality))

    def forward_with_aux(self, x: torch.Tensor, modality: str) -> dict[str, torch.Tensor]:
        """Main and auxiliary logits in one forward pass, for deep supervision.

        Returns ``{"main": (B, 1 + n, D, H, W), "dec_i": (B, 1 + n, D/2**i, H/2**i, W/2**i), ...}``, the keys of
        :attr:`deep_supervision_weights`; without deep supervision only ``"main"``. Pair it with
        :func:`~medmtl.models.deep_supervision.deep_supervision_loss`.
        """
        layers = self._run(x, modality, self._taps(aux=True))
        out = {"main": self.heads[modality](self._head_input(layers, modality))}
        for d in self.aux_depths:
            out[d] = self.aux_heads[modality][d](layers[d])
        return out

    def penalties(self) -> dict[str, torch.Tensor]:
        """All sharing penalties, keyed ``kind/depth``."""
        out = {}
        for mech in self.sharing:
            for depth, value in mech.penalties().items():
                out[f"{mech.kind}/{depth}"] = value
        return out

    def forward_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward pass (router balance losses), keyed ``kind/depth/...``; cleared on read."""
        out = {}
        for mech in self.sharing:
            for key, value in mech.forward_losses().items():
                out[f"{mech.kind}/{key}"] = value
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

    def task_parameters(self, modality: str) -> list[nn.Parameter]:
        """Trainable parameters that a batch of ``modality`` can put gradient on, deduplicated, in a stable order.

        Its column's stages and its heads; on a dual path also the other column's stages up to the last
        mixing depth; every mechanism's own parameters; minus what a mechanism declares exclusive to the
        other modality (:meth:`~medmtl.sharing.base.SharingMechanism.exclusive_parameters`).
        """
        modules: list[nn.Module] = [self.columns[modality], self.heads[modality], self.aux_heads[modality], *self.sharing]
        for other in MODALITIES:
            if other != modality:
                modules.extend(self.columns[other].stages[d] for d in self.depth_names[: self._last_mix + 1])
        excluded = {id(p) for m, params in ((m, ps) for mech in self.sharing for m, ps in mech.exclusive_parameters().items())
                    if m != modality for p in params}
        seen: set[int] = set()
        out = []
        for module in modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen and id(p) not in excluded:
                    seen.add(id(p))
                    out.append(p)
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters on which both modalities put gradient (tied stages, shared kernels, every stage
        on a dual path, mixing units), in the order of :meth:`task_parameters` of the first modality.

        Gradient-level weighting methods act on these; two independent columns (soft sharing) have none.
        """
        others = [{id(p) for p in self.task_parameters(m)} for m in MODALITIES[1:]]
        return [p for p in self.task_parameters(MODALITIES[0]) if all(id(p) in o for o in others)]
