"""Experiment configuration: one declared schema, YAML files, ``key.sub=value`` overrides.

Every hyper-parameter lives here with its default and one line of help (the ``description`` of
its field). A config is validated completely before any work starts; an unknown key, a wrong type
or a bad value raises :class:`ConfigError` naming the file and the dotted key.

Sharing mechanisms and weighting methods are discriminated unions keyed by ``kind`` and ``method``,
so each one declares exactly the hyper-parameters it has and nothing tests their names elsewhere.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medmtl.errors import ConfigError
from medmtl.modality import MODALITIES, Modality

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "LossConfig",
    "load_config",
    "apply_overrides",
    "config_to_yaml",
    "flatten_config",
    "DEPTH_NAMES_HELP",
]

DEPTH_NAMES_HELP = (
    "depth names are enc0..enc{K-2}, bottleneck, dec{K-2}..dec0 for a column with K channel levels"
)


class _Strict(BaseModel):
    """Base for all config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------- data
class DataConfig(_Strict):
    """Where the ingested dataset lives and how it is split and fed to training."""

    root: str = Field(
        "demo_data/data",
        description=(
            "DATA_DIR written by `medmtl ingest` (holds manifest.jsonl); relative paths are taken from the working directory"
        ),
    )
    val_fraction: float = Field(
        0.25, gt=0.0, lt=1.0,
        description="fraction of each modality's labelled cases held out for validation (model selection: best.pt)",
    )
    test_fraction: float = Field(
        0.0, ge=0.0, lt=1.0,
        description=(
            "fraction of each modality's labelled cases held out as a test set, never used for training or selection; 0 = the "
            "final scores are reported on the validation cases"
        ),
    )
    cache: Literal["memory", "none"] = Field(
        "memory",
        description="cache the deterministic part of the transform chain in memory (CacheDataset) or not at all",
    )
    label_budget: dict[Literal["ct", "mr"], int] = Field(
        default_factory=dict,
        description=(
            "per modality: train on only the first k labelled training cases (in the split's seeded order; validation and "
            "test cases unchanged), e.g. {mr: 3} makes MR scarce; a modality not listed uses all"
        ),
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per modality")
    augment_on_device: bool = Field(
        True,
        description=(
            "on CUDA, move the cached tensors to the GPU (ToDeviced after the cached part) so patch sampling and augmentation "
            "run there; the loader then runs in threads, without worker processes"
        ),
    )
    labels: dict[Modality, dict[int, str]] = Field(
        default_factory=lambda: {
            "ct": {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"},
            "mr": {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"},
        },
        description=("per modality: label value in the masks -> class name; 0 is background; "
                     "each head predicts its own modality's classes"),
    )

    @field_validator("label_budget")
    @classmethod
    def _budget_positive(cls, v: dict[str, int]) -> dict[str, int]:
        for m, k in v.items():
            if k < 1:
                raise ValueError(f"label_budget.{m} must be at least 1 training case, got {k}")
        return v

    @field_validator("labels")
    @classmethod
    def _labels_valid(cls, v: dict[str, dict[int, str]]) -> dict[str, dict[int, str]]:
        for modality in MODALITIES:
            if modality not in v or not v[modality]:
                raise ValueError(f"labels.{modality} must map at least one label value to a class name")
            if 0 in v[modality]:
                raise ValueError(f"labels.{modality}: value 0 is background and must not be listed")
            if any(k < 0 for k in v[modality]):
                raise ValueError(f"labels.{modality}: label values must be positive integers")
        return v


class AlbumentationsConfig(_Strict):
    """Slice-consistent in-plane augmentation with albumentations: one draw of parameters per patch, applied
    to every axial slice of the image and its mask; intensity limits are fractions of the patch's range."""

    enabled: bool = Field(False, description="apply the albumentations augmentation to training patches (after patch sampling)")
    p: float = Field(0.5, ge=0.0, le=1.0, description="probability that a patch is augmented at all")
    affine_p: float = Field(0.5, ge=0.0, le=1.0, description="probability of the in-plane affine (rotation, scale, translation)")
    rotate_deg: float = Field(15.0, ge=0.0, le=180.0, description="in-plane rotation range +- degrees")
    scale: tuple[float, float] = Field((0.9, 1.1), description="in-plane zoom range (min, max)")
    translate: float = Field(0.05, ge=0.0, le=0.5, description="in-plane shift range +- as a fraction of the slice size")
    grid_distortion_p: float = Field(0.2, ge=0.0, le=1.0, description="probability of a grid distortion")
    grid_distort_limit: float = Field(0.2, ge=0.0, le=1.0, description="grid distortion strength (albumentations distort_limit)")
    elastic_p: float = Field(
        0.0, ge=0.0, le=1.0,
        description="probability of an elastic deformation (slowest of the geometric ones)",
    )
    elastic_alpha: float = Field(20.0, ge=0.0, description="elastic displacement scale in pixels")
    elastic_sigma: float = Field(5.0, gt=0.0, description="elastic displacement smoothness (Gaussian sigma in pixels)")
    brightness_contrast_p: float = Field(0.3, ge=0.0, le=1.0, description="probability of a brightness and contrast change")
    brightness_limit: float = Field(
        0.1, ge=0.0, le=1.0,
        description="brightness shift range +- (fraction of the patch's intensity range)",
    )
    contrast_limit: float = Field(0.1, ge=0.0, le=1.0, description="contrast factor range 1 +- this")
    gamma_p: float = Field(0.3, ge=0.0, le=1.0, description="probability of a gamma change")
    gamma_limit: tuple[float, float] = Field((80.0, 120.0), description="gamma range in percent (100 = identity)")
    noise_p: float = Field(0.15, ge=0.0, le=1.0, description="probability of Gaussian noise (independent per voxel)")
    noise_std: tuple[float, float] = Field(
        (0.01, 0.05),
        description="noise standard deviation range (fraction of the patch's intensity range)",
    )


class PreprocessConfig(_Strict):
    """Deterministic preprocessing and patch sampling; values left null are taken from the plan."""

    target_spacing: dict[Modality, tuple[float, float, float] | None] = Field(
        default_factory=lambda: {"ct": None, "mr": None},
        description="per modality resampling spacing in mm (RAS order); null = planned from the data",
    )
    ct_window: tuple[float, float] | None = Field(
        None,
        description="CT clip window in HU; null = planned (0.5 and 99.5 foreground percentiles)",
    )
    patch_size: tuple[int, int, int] | None = Field(
        (64, 64, 32),
        description=(
            "training and sliding-window patch size in voxels (RAS order), for both modalities; null = planned per modality "
            "from memory_budget_mb"
        ),
    )
    memory_budget_mb: float = Field(
        8192.0, gt=0.0,
        description=(
            "accelerator memory for the activations of one modality's training batch (estimate: saved activations per voxel of "
            "the model x patch voxels x batch x paths); sets the planned patch and batch size"
        ),
    )
    min_batch_size: int = Field(
        2, ge=1,
        description="smallest planned batch per modality (nnU-Net: 2); the patch shrinks until it fits the budget",
    )
    max_batch_fraction: float = Field(
        0.05, gt=0.0, le=1.0,
        description="planned batch covers at most this fraction of a modality's voxels (nnU-Net: 5%, against overfitting)",
    )
    fg_samples_per_image: int = Field(
        100_000, ge=100,
        description="CT foreground voxels sampled per image for the intensity percentiles (all of them when fewer)",
    )
    pos_fraction: float = Field(
        0.67, ge=0.0, le=1.0,
        description="fraction of patches centred on a foreground class (spread evenly over classes)",
    )
    augment: bool = Field(True, description="random 3D affine and intensity augmentation on training patches")
    albumentations: AlbumentationsConfig = Field(
        default_factory=AlbumentationsConfig,
        description="slice-consistent in-plane augmentation with albumentations",
    )

    @field_validator("patch_size")
    @classmethod
    def _patch_divisible(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and any(p < 8 for p in v):
            raise ValueError("every patch dimension must be at least 8 voxels")
        return v


# -------------------------------------------------------------------------------------------- model
class ModelConfig(_Strict):
    """One column: a 3D encoder-decoder built from MONAI blocks with stages addressable by name."""

    channels: tuple[int, ...] = Field(
        (8, 16, 32, 64), min_length=2,
        description="feature channels per resolution level; the last is the bottleneck",
    )
    num_res_units: int = Field(1, ge=0, description="residual units per stage (0 = plain convolutions)")
    norm: Literal["instance", "batch", "group"] = Field("instance", description="normalization layer of every stage")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability inside the stages")
    in_channels: int = Field(1, ge=1, description="image channels per modality")
    deep_supervision_depths: list[str] = Field(
        default_factory=list,
        description=(
            "decoder depths (dec1, dec2, ...) that get an auxiliary head per modality; loss weights halve per level as in "
            "nnU-Net, normalized to sum 1; empty = no deep supervision"
        ),
    )

    @property
    def depth_names(self) -> list[str]:
        """Names of the stages in execution order (``enc0..``, ``bottleneck``, ``..dec0``)."""
        k = len(self.channels)
        return [f"enc{i}" for i in range(k - 1)] + ["bottleneck"] + [f"dec{i}" for i in reversed(range(k - 1))]

    def depth_shapes(self, patch_size: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Output shape ``(C, D, H, W)`` of every stage for an input patch (each size divisible by ``2**(K-1)``).

        ``enc_i`` and ``dec_i`` have ``channels[i]`` channels at ``1/2**i`` of the patch; the bottleneck
        has ``channels[-1]`` at ``1/2**(K-1)``. Both columns are built from this one section.
        """
        k = len(self.channels)
        level = {f"enc{i}": i for i in range(k - 1)} | {f"dec{i}": i for i in range(k - 1)} | {"bottleneck": k - 1}
        return {n: (self.channels[level[n]],) + tuple(p // 2 ** level[n] for p in patch_size) for n in self.depth_names}


# ------------------------------------------------------------------------------------------ sharing
class _SharingBase(_Strict):
    """What every mechanism's section declares about itself; the depth validator reads only this."""

    @property
    def mixes_activations(self) -> bool:
        """True when the mechanism mixes the columns' activations (each batch runs through both columns)."""
        return False

    @property
    def ties_parameters(self) -> bool:
        """True when the stages at its depths become one set of parameters used by both columns."""
        return False

    @property
    def penalizes_parameters(self) -> bool:
        """True when a penalty compares the two columns' own parameters (needs untied stages)."""
        return False

    @property
    def mixes_head_input(self) -> bool:
        """True when it replaces each head's input by a mix of layers (at most one mechanism may)."""
        return False

    @property
    def has_adapters(self) -> bool:
        """True when it adds low-rank adapters to a shared column (the LoRA family)."""
        return False

    @property
    def merges_into_kernels(self) -> bool:
        """True when its low-rank deltas fold into per-modality kernels for deployment (``models.merge``)."""
        return False

    @property
    def freezes_base(self) -> bool:
        """True when only its adapters train: every other parameter of the net is frozen."""
        return False

    def depth_keys(self, available: list[str]) -> dict[str, list[str]]:
        """Config key -> the depth names it lists (``"all"`` expanded, the one place that does); ``depths`` first."""
        depths = getattr(self, "depths")
        return {"depths": list(available) if depths == "all" else list(depths)}

    def resolved_depths(self, available: list[str]) -> list[str]:
        """The depths the mechanism acts at (``depths`` with ``"all"`` expanded), in config order."""
        return self.depth_keys(available)["depths"]

    def shared_depths(self, available: list[str]) -> list[str]:
        """Depths whose stage parameters receive gradient from both tasks because of this mechanism.

        Tied stages are used by both columns; a mixing unit runs each batch through both columns up to
        its last depth, so every stage up to there is on both tasks' paths. A penalty alone shares none.
        """
        depths = self.resolved_depths(available)
        if self.mixes_activations:
            last = max(available.index(d) for d in depths)
            return list(available[: last + 1])
        return depths if self.ties_parameters else []

    def check(self, *, index: int, model: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
        """Mechanism-specific checks against the model's stage ``shapes``; raise ValueError naming ``sharing.<index>.<key>``."""


class SoftSharingConfig(_SharingBase):
    """Penalty ``lambda_d * sum ||theta_ct - theta_mr||_F^2`` over the parameters of chosen depths."""

    kind: Literal["soft"] = "soft"
    depths: dict[str, float] = Field(..., description="depth name -> penalty weight lambda_d")
    exclude_norm_and_bias: bool = Field(
        True,
        description="leave normalization layers and biases modality-specific (not penalized)",
    )

    @field_validator("depths")
    @classmethod
    def _weights_nonneg(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("list at least one depth")
        for name, lam in v.items():
            if lam < 0:
                raise ValueError(f"penalty weight for depth {name!r} must be >= 0, got {lam}")
        return v

    @property
    def penalizes_parameters(self) -> bool:
        """The penalty compares the columns' parameters."""
        return True


class CrossStitchConfig(_SharingBase):
    """Cross-stitch units (Misra et al. 2016): learned 2x2 mixing of the columns' activations."""

    kind: Literal["cross_stitch"] = "cross_stitch"
    depths: list[str] = Field(..., min_length=1, description="depth names after which the columns' activations are mixed")
    per_channel: bool = Field(True, description="one 2x2 matrix per channel (True) or one per depth (False)")
    init: tuple[tuple[float, float], tuple[float, float]] = Field(
        ((0.9, 0.1), (0.1, 0.9)),
        description="initial mixing matrix [[ct<-ct, ct<-mr], [mr<-ct, mr<-mr]]",
    )
    lr_multiplier: float = Field(10.0, gt=0.0, description="learning rate of the mixing coefficients relative to the network's")

    @property
    def mixes_activations(self) -> bool:
        """Cross-stitch units mix activations."""
        return True


class SluiceConfig(_SharingBase):
    """Sluice units (Ruder et al. 2019, "Latent Multi-task Architecture Learning", AAAI).

    At each chosen depth both columns' channels are split into M subspaces and a learned (2M, 2M) alpha
    mixes all subspaces of both columns; learned beta weights mix chosen layers of a column before its
    head; an orthogonality penalty pushes a column's subspaces apart.
    """

    kind: Literal["sluice"] = "sluice"
    depths: list[str] = Field(..., min_length=1, description="depth names after which alpha mixes all subspaces of both columns")
    num_subspaces: int = Field(
        2, ge=1,
        description="M: subspaces each column's channels are split into at every chosen depth (must divide those channels)",
    )
    init: tuple[tuple[float, float], tuple[float, float]] = Field(
        ((0.9, 0.1), (0.1, 0.9)),
        description=(
            "initial column mixing [[ct<-ct, ct<-mr], [mr<-ct, mr<-mr]]; alpha starts as kron(init, I_M): subspace m mixes "
            "only with subspace m"
        ),
    )
    beta_depths: dict[str, float] = Field(
        default_factory=lambda: {"enc0": 0.1, "dec0": 0.9},
        description=(
            "depth -> initial beta weight of its output in each column's mix before the head; only layers of the head's input "
            "shape (channels[0] at full resolution: enc0, dec0)"
        ),
    )
    beta_mode: Literal["plain", "softmax"] = Field(
        "plain",
        description="plain learned beta weights (as the authors' code) or a softmax over learned logits (positive, summing to 1)",
    )
    orthogonality_weight: float = Field(
        1e-3, ge=0.0,
        description=(
            "weight of sum_(i<j) ||G_i^T G_j||_F^2 between a column's subspaces (filters of the convolutions writing them), "
            "per depth; no term with one subspace"
        ),
    )
    lr_multiplier: float = Field(
        10.0, gt=0.0,
        description="learning rate of alpha and beta relative to the network's (no weight decay)",
    )

    @property
    def mixes_activations(self) -> bool:
        """Alpha mixes activations."""
        return True

    @property
    def mixes_head_input(self) -> bool:
        """Beta mixes layers before the heads."""
        return True

    def depth_keys(self, available: list[str]) -> dict[str, list[str]]:
        """``depths`` (alpha) and ``beta_depths``."""
        return {"depths": list(self.depths), "beta_depths": list(self.beta_depths)}

    def check(self, *, index: int, model: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
        """Subspaces divide the channels; beta layers have the head's input shape; softmax inits are positive."""
        for d in self.depths:
            if shapes[d][0] % self.num_subspaces:
                raise ValueError(f"sharing.{index}.num_subspaces: {self.num_subspaces} subspaces do not divide "
                                 f"the {shapes[d][0]} channels of depth {d!r}")
        head = shapes[model.depth_names[-1]]
        same = [n for n, s in shapes.items() if s == head]
        if not self.beta_depths:
            raise ValueError(f"sharing.{index}.beta_depths: list at least one layer (e.g. {{{model.depth_names[-1]}: 1.0}})")
        for d in self.beta_depths:
            # Layers of other resolutions would need resampling and a channel projection the paper
            # does not have; refuse them here instead of failing in the first forward pass.
            if shapes[d] != head:
                raise ValueError(f"sharing.{index}.beta_depths: depth {d!r} outputs {shapes[d][0]} channels at "
                                 f"1/{head[1] // shapes[d][1]} resolution but the heads read {head[0]} channels at full "
                                 f"resolution; beta mixes only layers of the head's shape ({', '.join(same)})")
            if self.beta_mode == "softmax" and self.beta_depths[d] <= 0:
                raise ValueError(f"sharing.{index}.beta_depths: with beta_mode softmax every initial weight must be > 0 "
                                 f"(got {self.beta_depths[d]} for {d!r})")


class HardSharingConfig(_SharingBase):
    """Hard sharing: the chosen stages are one module used by both columns (baseline)."""

    kind: Literal["hard"] = "hard"
    depths: list[str] | Literal["all"] = Field(
        "all",
        description="depth names whose stages are shared, or 'all' (one column, one head per modality)",
    )

    @property
    def ties_parameters(self) -> bool:
        """The stages become one module."""
        return True


class SharedKernelsConfig(_SharingBase):
    """Shared convolution kernels with modality-specific normalization (Dou et al. 2020)."""

    kind: Literal["shared_kernels"] = "shared_kernels"
    depths: list[str] | Literal["all"] = Field("all", description="depth names whose convolutions are shared, or 'all'")

    @property
    def ties_parameters(self) -> bool:
        """The convolutions become one set of parameters."""
        return True


class _LoRAFamilyConfig(_SharingBase):
    """What the LoRA-family mechanisms share: one column for both modalities, low-rank deltas at chosen depths."""

    depths: list[str] | Literal["all"] = Field(
        "all",
        description="depth names whose convolutions (Conv3d and the decoders' ConvTranspose3d) get low-rank deltas, or 'all'; "
                    "every other parameter is shared",
    )
    rank: int = Field(
        4, ge=1, description="rank r of each delta (capped at a kernel's own rank, e.g. 1 for a 1x1x1 from one channel)",
    )
    alpha: float = Field(8.0, gt=0.0, description="LoRA scale numerator: a delta is (alpha / r) B A")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="dropout on the deltas' input in training (0 = one convolution with the merged kernel; > 0 adds another)",
    )
    modality_norms: bool = Field(
        True, description="keep normalization layers per modality (as shared kernels); false = norms shared too",
    )
    freeze_base: bool = Field(
        False,
        description="train only the adapters (deltas, routers); column, norms and heads stay as loaded (`medmtl adapt`)",
    )

    @property
    def ties_parameters(self) -> bool:
        """The whole column is one set of parameters (the deltas ride on it)."""
        return True

    @property
    def has_adapters(self) -> bool:
        """Low-rank deltas on the shared column's kernels."""
        return True

    @property
    def freezes_base(self) -> bool:
        """``freeze_base``: only the deltas (and routers) train."""
        return self.freeze_base

    def adapter_depths(self, available: list[str]) -> list[str]:
        """The depths whose convolutions get deltas (``depths``, ``"all"`` expanded); the column is tied at every depth."""
        return list(available) if self.depths == "all" else list(self.depths)

    def depth_keys(self, available: list[str]) -> dict[str, list[str]]:
        """``depths``: every depth is tied (the column is shared); the adapted depths are checked in :meth:`check`."""
        return {"depths": list(available)}

    def check(self, *, index: int, model: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
        """The adapted depths exist."""
        names = model.depth_names
        for d in self.adapter_depths(names):
            if d not in names:
                raise ValueError(f"sharing.{index}.depths: unknown depth {d!r}; {DEPTH_NAMES_HELP} (here: {', '.join(names)})")


class LoRAConfig(_LoRAFamilyConfig):
    """Modality LoRA: a shared column plus per-modality deltas W_m = W + (alpha/r) B_m A_m, B zero at the start."""

    kind: Literal["lora"] = "lora"
    modalities: list[Modality] = Field(
        default_factory=lambda: list(MODALITIES), min_length=1,
        description="modalities that get deltas; the others use the shared kernels as they are (e.g. [mr] to adapt a CT model)",
    )

    @property
    def merges_into_kernels(self) -> bool:
        """Per-modality deltas fold into per-modality kernels."""
        return True


class MTLoRAConfig(_LoRAFamilyConfig):
    """MTLoRA (Agiza et al., CVPR 2024): a task-agnostic delta shared by both modalities plus one per modality."""

    kind: Literal["mtlora"] = "mtlora"
    shared_rank: int = Field(4, ge=1, description="rank of the task-agnostic delta shared by both modalities")
    shared_alpha: float = Field(8.0, gt=0.0, description="scale numerator of the shared delta (alpha_s / r_s)")

    @property
    def merges_into_kernels(self) -> bool:
        """The shared and the per-modality deltas fold into per-modality kernels."""
        return True


class MixtureOfLoRAConfig(_LoRAFamilyConfig):
    """K LoRA experts per depth, a per-sample top-k router on the depth's pooled input, a Switch/GShard balance loss."""

    kind: Literal["mixture_of_lora"] = "mixture_of_lora"
    depths: list[str] | Literal["all"] = Field(
        default_factory=lambda: ["bottleneck"], description="depth names that get K experts and a router each, or 'all'",
    )
    num_experts: int = Field(4, ge=2, description="K: LoRA experts per chosen depth, shared by both modalities")
    top_k: int = Field(2, ge=1, description="experts per sample; their gates are renormalised to sum 1")
    modality_embedding: bool = Field(True, description="the router also reads a learned embedding of the sample's modality")
    embedding_dim: int = Field(4, ge=1, description="length of the modality embedding")
    balance_weight: float = Field(
        1e-2, ge=0.0, description="weight of the load-balancing loss K sum_i f_i P_i per depth and forward batch (Switch: 1e-2)",
    )

    @model_validator(mode="after")
    def _top_k_fits(self) -> "MixtureOfLoRAConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
        return self


SharingConfig = Annotated[
    Union[SoftSharingConfig, CrossStitchConfig, SluiceConfig, HardSharingConfig, SharedKernelsConfig,
          LoRAConfig, MTLoRAConfig, MixtureOfLoRAConfig],
    Field(discriminator="kind"),
]


# ---------------------------------------------------------------------------------------- weighting
class _WeightingBase(_Strict):
    """What every weighting method's section declares about what it needs; the step and the builder read only this."""

    @property
    def probe_depth(self) -> str | None:
        """Depth whose parameters ``W`` (both columns) get each task's gradient norm read between the backward
        passes (GradNorm's ``W``); None = no probe."""
        return None

    @property
    def gradient_parameters(self) -> Literal["shared"] | None:
        """Parameters on which :meth:`~medmtl.weighting.base.LossWeighting.adjust_gradients` gets each task's
        gradient: ``"shared"`` = those both tasks put gradient on; None = the hook is not called (no copies)."""
        return None

    def check(self, experiment: "ExperimentConfig") -> None:
        """Config-time checks against the whole experiment; raise ValueError naming ``weighting.<key>``.

        The default checks what the declarations above need: the probe depth exists, and a method acting
        on shared parameters has some (two independent columns with soft sharing have none).
        """
        names = experiment.model.depth_names
        if self.probe_depth is not None and self.probe_depth not in names:
            raise ValueError(f"weighting.depth: unknown depth {self.probe_depth!r}; {DEPTH_NAMES_HELP} "
                             f"(here: {', '.join(names)})")
        if self.gradient_parameters == "shared" and not experiment.shared_depths:
            method = getattr(self, "method")
            raise ValueError(
                f"weighting.method: {method} acts on the parameters both tasks put gradient on, but the sharing section "
                f"({', '.join(m.kind for m in experiment.sharing) or 'empty'}) has none: the columns are independent, so "
                "the method would do nothing; add a mechanism that shares parameters (hard, shared_kernels, cross_stitch, "
                "sluice) or choose another weighting method")


class EqualWeightingConfig(_WeightingBase):
    """Every task loss weighted 1."""

    method: Literal["equal"] = "equal"


class GradNormConfig(_WeightingBase):
    """GradNorm (Chen et al. 2018) on the parameters of one depth present in both columns."""

    method: Literal["gradnorm"] = "gradnorm"
    alpha: float = Field(1.5, ge=0.0, description="asymmetry: how strongly slow tasks are pulled up")
    lr: float = Field(0.025, gt=0.0, description="learning rate of the task weights' own optimizer (Adam)")
    depth: str = Field("bottleneck", description="depth whose parameters (in both columns) are W")
    initial_loss_steps: int = Field(
        1, ge=1,
        description="L_i(0) is the mean loss of the first N steps (1 = first step, as published)",
    )

    @property
    def probe_depth(self) -> str:
        """GradNorm's ``W``: the parameters of ``depth`` in both columns."""
        return self.depth


class UncertaintyWeightingConfig(_WeightingBase):
    """Homoscedastic uncertainty weighting (Kendall et al. 2018): term ``exp(-s_i) L_i + s_i``, ``s_i`` learned."""

    method: Literal["uncertainty"] = "uncertainty"
    init_log_variance: float = Field(0.0, description="initial s_i = log sigma_i^2 of every task (0 = weight 1)")
    lr: float | None = Field(
        None, gt=0.0,
        description="learning rate of the s_i in the network optimizer (no weight decay); null = train.lr",
    )


class DWAConfig(_WeightingBase):
    """Dynamic Weight Average (Liu et al. 2019) from epoch-mean losses; an epoch is a fixed number of steps."""

    method: Literal["dwa"] = "dwa"
    temperature: float = Field(
        2.0, gt=0.0,
        description="softmax temperature T (2 as published; larger = closer to equal weights)",
    )
    steps_per_epoch: int = Field(
        50, ge=1,
        description="applied steps that make one DWA epoch (training is iteration based); weights are 1 for the first two epochs",
    )


class DSTConfig(_WeightingBase):
    """Dropped scheduled task (Malhotra et al. 2020/2023): drop a task for a step as it progresses and stalls."""

    method: Literal["dst"] = "dst"
    max_drop_probability: float = Field(
        0.5, ge=0.0, lt=1.0,
        description="drop probability of a task that has fully converged and stalled",
    )
    progress_share: float = Field(
        0.5, ge=0.0, le=1.0,
        description="share of the drop probability from training progress 1 - L_i/L_i(0); the rest from stagnancy",
    )
    ema: float = Field(
        0.9, ge=0.0, lt=1.0,
        description="smoothing factor of each task's loss before progress and stagnancy are read",
    )
    stall_patience: int = Field(
        50, ge=1,
        description="forwarded steps without improvement after which a task counts as fully stalled",
    )
    stall_tolerance: float = Field(
        0.01, ge=0.0, lt=1.0,
        description="relative fall of the smoothed loss below its best that counts as an improvement",
    )
    seed: int = Field(0, ge=0, description="seed of the drop draws (identical on every rank; the same seed reproduces a run)")


class _GradientCombinationBase(_WeightingBase):
    """A method that combines the tasks' gradients on the shared parameters (loss weights stay 1)."""

    @property
    def gradient_parameters(self) -> Literal["shared"]:
        """Each task's gradient on the parameters both tasks put gradient on."""
        return "shared"


class MetaBalanceConfig(_GradientCombinationBase):
    """MetaBalance (He et al. 2022): the auxiliary task's gradient rescaled toward the main task's magnitude."""

    method: Literal["metabalance"] = "metabalance"
    main_task: Modality = Field(
        "ct",
        description="target task whose moving-average gradient magnitude the other task's gradient is rescaled toward",
    )
    relax_factor: float = Field(
        0.7, ge=0.0, le=1.0,
        description="r: 1 = the auxiliary gradient takes the main one's magnitude, 0 = unchanged (equal weighting)",
    )
    beta: float = Field(0.9, ge=0.0, lt=1.0, description="moving-average factor of the gradient magnitudes (0.9 as published)")


class PCGradConfig(_GradientCombinationBase):
    """PCGrad (Yu et al. 2020): each task's gradient projected off the conflicting gradients of the others."""

    method: Literal["pcgrad"] = "pcgrad"
    seed: int = Field(0, ge=0, description="seed of the per-step random task order (identical on every rank)")


class CAGradConfig(_GradientCombinationBase):
    """CAGrad (Liu et al. 2021): the update near the average gradient that best improves the worst task."""

    method: Literal["cagrad"] = "cagrad"
    c: float = Field(
        0.4, ge=0.0,
        description="radius of the ball around the average gradient, relative to its norm (0 = equal weighting)",
    )
    rescale: Literal["none", "one_plus_c_squared", "one_plus_c"] = Field(
        "none",
        description="divide the update by 1 (the paper), 1 + c^2 or 1 + c (the authors' code's options)",
    )


WeightingConfig = Annotated[
    Union[EqualWeightingConfig, GradNormConfig, UncertaintyWeightingConfig, DWAConfig, DSTConfig,
          MetaBalanceConfig, PCGradConfig, CAGradConfig],
    Field(discriminator="method"),
]


# ----------------------------------------------------------------------------------------- training
class TrainConfig(_Strict):
    """Optimization: steps, batches, optimizer, schedule, precision, validation."""

    steps: int = Field(400, ge=1, description="optimizer steps in total")
    batch_size: dict[Modality, int] | None = Field(
        default_factory=lambda: {"ct": 2, "mr": 2},
        description=(
            "patches per step per modality (sets the CT:MR sampling ratio); null = planned from preprocess.memory_budget_mb"
        ),
    )
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="network optimizer")
    lr: float = Field(3e-3, gt=0.0, description="initial learning rate")
    weight_decay: float = Field(1e-5, ge=0.0, description="decoupled weight decay (adamw) or L2 (sgd)")
    momentum: float = Field(0.99, ge=0.0, lt=1.0, description="SGD momentum (nesterov)")
    poly_power: float = Field(0.9, ge=0.0, description="poly learning-rate schedule exponent (0 = constant)")
    grad_clip: float | None = Field(12.0, gt=0.0, description="max global gradient norm; null = no clipping")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="autocast policy: bf16 on CPU or CUDA, fp16 (with GradScaler) on CUDA only",
    )
    val_every: int = Field(100, ge=1, description="validate every N steps (and at the end)")
    log_every: int = Field(10, ge=1, description="send step metrics to the tracker every N steps (batched)")
    checkpoint_every: int = Field(
        50, ge=1,
        description="write DIR/last.pt every N steps (and at the end); best.pt on each better validation score",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available")
    compile: bool = Field(
        False,
        description=("compile the network with torch.compile (opt-in: minutes of compilation first; "
                     "benchmarks/train_step.py measures whether it pays off on your device)"),
    )

    @field_validator("batch_size")
    @classmethod
    def _both_modalities(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        for m in MODALITIES if v is not None else ():
            if v.get(m, 0) < 1:
                raise ValueError(f"batch_size.{m} must be a positive integer")
        return v


class LossConfig(_Strict):
    """Segmentation loss of each head: MONAI ``DiceCELoss`` on softmax outputs against one-hot labels."""

    kind: Literal["dice_ce"] = Field("dice_ce", description="loss function: Dice plus cross-entropy (MONAI DiceCELoss)")
    include_background: bool = Field(False, description="include the background channel in the Dice term")
    squared_pred: bool = Field(False, description="square the predictions in the Dice denominator (V-Net)")
    batch: bool = Field(False, description="compute the Dice over the whole batch instead of per sample, then average")
    smooth_nr: float = Field(1e-5, ge=0.0, description="constant added to the Dice numerator")
    smooth_dr: float = Field(1e-5, ge=0.0, description="constant added to the Dice denominator")
    lambda_dice: float = Field(1.0, ge=0.0, description="weight of the Dice term")
    lambda_ce: float = Field(1.0, ge=0.0, description="weight of the cross-entropy term")


class EvalConfig(_Strict):
    """Sliding-window inference used for validation, evaluation and the deployed model."""

    sw_overlap: float = Field(0.5, ge=0.0, lt=1.0, description="sliding-window overlap")
    sw_mode: Literal["gaussian", "constant"] = Field("gaussian", description="blending of overlapping windows")
    sw_batch_size: int = Field(2, ge=1, description="windows per forward pass")


class RegistryGateConfig(_Strict):
    """What a model version must show before `medmtl promote` moves alias ``champion`` to it."""

    min_dice: dict[str, float] = Field(
        default_factory=dict,
        description="held-out Dice floors: key '<modality>/<class>' (e.g. ct/liver, mr/mean) or a class name for both modalities",
    )
    min_dice_all: float | None = Field(None, ge=0.0, le=1.0, description="floor for every class of every modality; null = none")
    no_worse_than_champion: bool = Field(
        True,
        description="refuse a version whose Dice is below the current champion's on the same evaluation set",
    )
    compare_on: Literal["mean", "per_class"] = Field(
        "mean",
        description="compare with the champion on each modality's mean Dice, or on every class",
    )
    tolerance: float = Field(0.0, ge=0.0, le=1.0, description="Dice drop against the champion still accepted")

    @field_validator("min_dice")
    @classmethod
    def _floors_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for key, floor in v.items():
            if not 0.0 <= floor <= 1.0:
                raise ValueError(f"min_dice.{key}: a Dice floor is between 0 and 1, got {floor}")
        return v


class TrackingConfig(_Strict):
    """MLflow tracking and registry."""

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; null = $MLFLOW_TRACKING_URI or the embedded SQLite store under mlflow/",
    )
    experiment: str = Field("medmtl", description="MLflow experiment name")
    registered_model: str = Field("medmtl-abdomen", description="name of the registered model")
    log_model: bool = Field(True, description="log the deployable pyfunc model at the end of the run")
    http_timeout_s: int = Field(
        10, ge=1,
        description=(
            "seconds one request to a tracking server may take (sets MLFLOW_HTTP_REQUEST_TIMEOUT; MLflow's default is 120)"
        ),
    )
    http_max_retries: int = Field(
        2, ge=0, le=10,
        description="retries of a failed request (sets MLFLOW_HTTP_REQUEST_MAX_RETRIES; MLflow's default 7 blocks for minutes)",
    )
    http_backoff_factor: int = Field(
        1, ge=0, le=120,
        description="exponential backoff factor between retries in seconds (sets MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR)",
    )
    flush_interval_s: float = Field(
        5.0, gt=0.0,
        description="the background sender sends buffered metric points at least this often",
    )
    retry_interval_s: float = Field(
        15.0, gt=0.0,
        description="while the server is unreachable, try again this often (records wait in the spool on disk)",
    )
    final_sync_timeout_s: float = Field(
        120.0, ge=0.0,
        description="at the end of a run, keep trying to send spooled records this long, then leave them on disk",
    )
    system_metrics: bool = Field(
        True,
        description="log MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) when psutil is installed",
    )
    system_metrics_interval_s: float = Field(10.0, gt=0.0, description="sampling interval of the system metrics in seconds")
    overlay_cases: int = Field(
        4, ge=0,
        description="held-out cases per modality drawn as overlay pictures (mid slice, reference and predicted contours)",
    )
    gate: RegistryGateConfig = Field(default_factory=RegistryGateConfig, description="promotion gates of `medmtl promote`")


class ExperimentConfig(_Strict):
    """A whole experiment: data, preprocessing, model, sharing, weighting, training, evaluation, tracking."""

    name: str = Field("experiment", description="experiment name (run name prefix)")
    seed: int = Field(0, description="seed for splits, sampling, augmentation and initialization")
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sharing: list[SharingConfig] = Field(
        default_factory=list,
        description="sharing mechanisms at chosen depths; empty = single-task baseline (independent columns)",
    )
    weighting: WeightingConfig = Field(
        default_factory=EqualWeightingConfig,
        description=("loss or gradient weighting method (equal, gradnorm, uncertainty, dwa, dst, metabalance, pcgrad, "
                     "cagrad) and its hyper-parameters"),
    )
    loss: LossConfig = Field(default_factory=LossConfig, description="segmentation loss of each head")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _depths_exist(self) -> "ExperimentConfig":
        names = self.model.depth_names
        help_here = f"{DEPTH_NAMES_HELP} (here: {', '.join(names)})"
        patch = self.preprocess.patch_size
        divisor = 2 ** (len(self.model.channels) - 1)
        if patch is not None and any(p % divisor for p in patch):
            # Otherwise each decoder stage's upsampled map and its skip connection differ in shape.
            raise ValueError(f"preprocess.patch_size: {list(patch)} must be divisible by {divisor} in every dimension "
                             f"(model.channels has {len(self.model.channels)} levels, each halving the size)")
        # A planned patch (null) is a multiple of the divisor too; relative shapes are all the checks need.
        shapes = self.model.depth_shapes(patch if patch is not None else (divisor,) * 3)
        aux_choices = [n for n in names if n.startswith("dec") and n != names[-1]]
        for d in self.model.deep_supervision_depths:
            if d not in names:
                raise ValueError(f"model.deep_supervision_depths: unknown depth {d!r}; {help_here}")
            if not d.startswith("dec") or d == names[-1]:
                raise ValueError(f"model.deep_supervision_depths: {d!r} is not a decoder depth below the main head "
                                 f"({names[-1]}); choose among "
                                 f"{', '.join(aux_choices) or 'none (add a level to model.channels)'}")
        tied: dict[str, str] = {}
        mixed: dict[str, int] = {}
        head_mixers: list[int] = []
        for i, mech in enumerate(self.sharing):
            keys = mech.depth_keys(names)
            for key, depths in keys.items():
                for d in depths:
                    if d not in names:
                        raise ValueError(f"sharing.{i}.{key}: unknown depth {d!r}; {help_here}")
            for d in keys["depths"]:
                # Two mechanisms that both own a stage's parameters would silently override each other.
                if mech.ties_parameters:
                    if d in tied:
                        raise ValueError(f"sharing.{i}.depths: depth {d!r} already shared by sharing.{tied[d]}")
                    tied[d] = f"{i} ({mech.kind})"
                # Two mixing units after one stage would apply in list order, which nobody asked for.
                if mech.mixes_activations:
                    if d in mixed:
                        raise ValueError(f"sharing.{i}.depths: depth {d!r} is already mixed by sharing.{mixed[d]}; "
                                         "use one mixing unit per depth")
                    mixed[d] = i
            if mech.mixes_head_input:
                head_mixers.append(i)
            mech.check(index=i, model=self.model, shapes=shapes)
        if len(head_mixers) > 1:
            raise ValueError(f"sharing.{head_mixers[1]}: only one mechanism may mix layers before the heads "
                             f"(also sharing.{head_mixers[0]})")
        for i, mech in enumerate(self.sharing):
            for d in mech.depth_keys(names)["depths"] if mech.penalizes_parameters else []:
                if d in tied:
                    raise ValueError(f"sharing.{i}.depths: depth {d!r} is already shared by sharing.{tied[d]}; "
                                     "a penalty between a stage and itself is zero, remove the depth from one of them")
        self.weighting.check(self)
        return self

    @property
    def mixes_activations(self) -> bool:
        """True when a unit mixes the columns' activations (each batch then runs through both columns)."""
        return any(m.mixes_activations for m in self.sharing)

    @property
    def shared_depths(self) -> list[str]:
        """Depths whose parameters receive gradient from both tasks (tied, or on a dual path), in execution order."""
        names = self.model.depth_names
        shared = {d for m in self.sharing for d in m.shared_depths(names)}
        return [d for d in names if d in shared]


# ------------------------------------------------------------------------------------------ loading
def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `medmtl config show` lists every key)"
        shows_input = e["type"] not in ("extra_forbidden", "missing") and not isinstance(e.get("input"), dict)
        lines.append((f"  {key}: " if key else "  ") + msg + (f" (got {e['input']!r})" if shows_input else ""))
    return "\n".join(lines)


def _union_tags(*unions: Any) -> set[str]:
    """The ``kind``/``method`` values of the union members: pydantic puts them into error locations."""
    tags: set[str] = set()
    for union in unions:
        for member in get_args(get_args(union)[0]):
            for name in ("kind", "method"):
                if name in member.model_fields:
                    tags.update(get_args(member.model_fields[name].annotation))
    return tags


_UNION_TAGS = _union_tags(SharingConfig, WeightingConfig)


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML (numbers, booleans, lists, null); fall back to the raw string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``key.sub=value`` overrides applied (list items by index).

    Raises :class:`ConfigError` for an override without ``=`` or one that walks into a scalar.
    """
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value (e.g. train.steps=50)")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        node: Any = out
        for j, part in enumerate(parts[:-1]):
            where = ".".join(parts[: j + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {where} is not an index of the list at "
                                      f"{'.'.join(parts[:j]) or '<root>'}")
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:j])} is a value, not a section")
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: {last} is not an index of the list")
            node[int(last)] = _parse_value(text)
        else:
            node[last] = _parse_value(text)
    return out


def validate_config(raw: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    """Validate a raw mapping against the schema; errors name ``source`` and the dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping of keys")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment, apply ``key.sub=value`` overrides and validate everything.

    ``path=None`` starts from the schema defaults. Raises :class:`ConfigError` naming the file and key.
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; pass a YAML file such as configs/demo.yaml")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
        raw = loaded if loaded is not None else {}
        if not isinstance(raw, dict):
            raise ConfigError(f"invalid configuration in {p}: the top level must be a mapping of keys")
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " with overrides " + " ".join(overrides)
    return validate_config(raw, source)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-compatible data (round-trips through :func:`validate_config`)."""
    def plain(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: plain(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [plain(v) for v in node]
        return node

    # python mode keeps integer label values as integer keys (JSON mode would turn them into strings)
    return plain(cfg.model_dump(mode="python"))


def config_to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML text, every key present."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def flatten_config(cfg: ExperimentConfig) -> dict[str, str]:
    """Dotted-key view of the resolved config (for MLflow params), values as strings."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = json.dumps(node) if not isinstance(node, str) else node

    walk("", config_to_dict(cfg))
    return flat
