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
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "load_config",
    "apply_overrides",
    "config_to_yaml",
    "flatten_config",
    "DEPTH_NAMES_HELP",
]

DEPTH_NAMES_HELP = (
    "depth names are enc0..enc{K-2}, bottleneck, dec{K-2}..dec0 for a column with K channel levels"
)


class ConfigError(ValueError):
    """A configuration file, key or override is invalid; the message names the file and key."""


class _Strict(BaseModel):
    """Base for all config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------- data
class DataConfig(_Strict):
    """Where the ingested dataset lives and how it is split and fed to training."""

    root: str = Field("demo_data/data", description="DATA_DIR written by `medmtl ingest` (holds manifest.jsonl); relative paths are taken from the working directory")
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of each modality's labelled cases held out for validation and evaluation")
    cache: Literal["memory", "none"] = Field("memory", description="cache the deterministic part of the transform chain in memory (CacheDataset) or not at all")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per modality")
    labels: dict[Literal["ct", "mr"], dict[int, str]] = Field(
        default_factory=lambda: {
            "ct": {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"},
            "mr": {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"},
        },
        description="per modality: label value in the masks -> class name; 0 is background; each head predicts its own modality's classes",
    )

    @field_validator("labels")
    @classmethod
    def _labels_valid(cls, v: dict[str, dict[int, str]]) -> dict[str, dict[int, str]]:
        for modality in ("ct", "mr"):
            if modality not in v or not v[modality]:
                raise ValueError(f"labels.{modality} must map at least one label value to a class name")
            if 0 in v[modality]:
                raise ValueError(f"labels.{modality}: value 0 is background and must not be listed")
            if any(k < 0 for k in v[modality]):
                raise ValueError(f"labels.{modality}: label values must be positive integers")
        return v


class PreprocessConfig(_Strict):
    """Deterministic preprocessing and patch sampling; values left null are taken from the plan."""

    target_spacing: dict[Literal["ct", "mr"], tuple[float, float, float] | None] = Field(
        default_factory=lambda: {"ct": None, "mr": None},
        description="per modality resampling spacing in mm (RAS order); null = planned from the data",
    )
    ct_window: tuple[float, float] | None = Field(None, description="CT clip window in HU; null = planned (0.5 and 99.5 foreground percentiles)")
    patch_size: tuple[int, int, int] = Field((64, 64, 32), description="training patch size in voxels (RAS order)")
    pos_fraction: float = Field(0.67, ge=0.0, le=1.0, description="fraction of patches centred on a foreground class (spread evenly over classes)")
    augment: bool = Field(True, description="random 3D affine and intensity augmentation on training patches")

    @field_validator("patch_size")
    @classmethod
    def _patch_divisible(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(p < 8 for p in v):
            raise ValueError("every patch dimension must be at least 8 voxels")
        return v


# -------------------------------------------------------------------------------------------- model
class ModelConfig(_Strict):
    """One column: a 3D encoder-decoder built from MONAI blocks with stages addressable by name."""

    channels: tuple[int, ...] = Field((8, 16, 32, 64), min_length=2, description="feature channels per resolution level; the last is the bottleneck")
    num_res_units: int = Field(1, ge=0, description="residual units per stage (0 = plain convolutions)")
    norm: Literal["instance", "batch", "group"] = Field("instance", description="normalization layer of every stage")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability inside the stages")
    in_channels: int = Field(1, ge=1, description="image channels per modality")

    @property
    def depth_names(self) -> list[str]:
        """Names of the stages in execution order (``enc0..``, ``bottleneck``, ``..dec0``)."""
        k = len(self.channels)
        return [f"enc{i}" for i in range(k - 1)] + ["bottleneck"] + [f"dec{i}" for i in reversed(range(k - 1))]


# ------------------------------------------------------------------------------------------ sharing
class SoftSharingConfig(_Strict):
    """Penalty ``lambda_d * sum ||theta_ct - theta_mr||_F^2`` over the parameters of chosen depths."""

    kind: Literal["soft"] = "soft"
    depths: dict[str, float] = Field(..., description="depth name -> penalty weight lambda_d")
    exclude_norm_and_bias: bool = Field(True, description="leave normalization layers and biases modality-specific (not penalized)")

    @field_validator("depths")
    @classmethod
    def _weights_nonneg(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("list at least one depth")
        for name, lam in v.items():
            if lam < 0:
                raise ValueError(f"penalty weight for depth {name!r} must be >= 0, got {lam}")
        return v


class CrossStitchConfig(_Strict):
    """Cross-stitch units (Misra et al. 2016): learned 2x2 mixing of the columns' activations."""

    kind: Literal["cross_stitch"] = "cross_stitch"
    depths: list[str] = Field(..., min_length=1, description="depth names after which the columns' activations are mixed")
    per_channel: bool = Field(True, description="one 2x2 matrix per channel (True) or one per depth (False)")
    init: tuple[tuple[float, float], tuple[float, float]] = Field(((0.9, 0.1), (0.1, 0.9)), description="initial mixing matrix [[ct<-ct, ct<-mr], [mr<-ct, mr<-mr]]")
    lr_multiplier: float = Field(10.0, gt=0.0, description="learning rate of the mixing coefficients relative to the network's")


class HardSharingConfig(_Strict):
    """Hard sharing: the chosen stages are one module used by both columns (baseline)."""

    kind: Literal["hard"] = "hard"
    depths: list[str] | Literal["all"] = Field("all", description="depth names whose stages are shared, or 'all' (one column, one head per modality)")


class SharedKernelsConfig(_Strict):
    """Shared convolution kernels with modality-specific normalization (Dou et al. 2020)."""

    kind: Literal["shared_kernels"] = "shared_kernels"
    depths: list[str] | Literal["all"] = Field("all", description="depth names whose convolutions are shared, or 'all'")


SharingConfig = Annotated[
    Union[SoftSharingConfig, CrossStitchConfig, HardSharingConfig, SharedKernelsConfig],
    Field(discriminator="kind"),
]


# ---------------------------------------------------------------------------------------- weighting
class EqualWeightingConfig(_Strict):
    """Every task loss weighted 1."""

    method: Literal["equal"] = "equal"


class GradNormConfig(_Strict):
    """GradNorm (Chen et al. 2018) on the parameters of one depth present in both columns."""

    method: Literal["gradnorm"] = "gradnorm"
    alpha: float = Field(1.5, ge=0.0, description="asymmetry: how strongly slow tasks are pulled up")
    lr: float = Field(0.025, gt=0.0, description="learning rate of the task weights' own optimizer (Adam)")
    depth: str = Field("bottleneck", description="depth whose parameters (in both columns) are W")
    initial_loss_steps: int = Field(1, ge=1, description="L_i(0) is the mean loss of the first N steps (1 = first step, as published)")


WeightingConfig = Annotated[Union[EqualWeightingConfig, GradNormConfig], Field(discriminator="method")]


# ----------------------------------------------------------------------------------------- training
class TrainConfig(_Strict):
    """Optimization: steps, batches, optimizer, schedule, precision, validation."""

    steps: int = Field(400, ge=1, description="optimizer steps in total")
    batch_size: dict[Literal["ct", "mr"], int] = Field(default_factory=lambda: {"ct": 2, "mr": 2}, description="patches per step per modality (sets the CT:MR sampling ratio)")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="network optimizer")
    lr: float = Field(3e-3, gt=0.0, description="initial learning rate")
    weight_decay: float = Field(1e-5, ge=0.0, description="decoupled weight decay (adamw) or L2 (sgd)")
    momentum: float = Field(0.99, ge=0.0, lt=1.0, description="SGD momentum (nesterov)")
    poly_power: float = Field(0.9, ge=0.0, description="poly learning-rate schedule exponent (0 = constant)")
    grad_clip: float | None = Field(12.0, gt=0.0, description="max global gradient norm; null = no clipping")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast policy: bf16 on CPU or CUDA, fp16 (with GradScaler) on CUDA only")
    val_every: int = Field(100, ge=1, description="validate every N steps (and at the end)")
    log_every: int = Field(10, ge=1, description="send step metrics to the tracker every N steps (batched)")
    checkpoint_every: int = Field(50, ge=1, description="write DIR/last.pt every N steps (and at the end); best.pt on each better validation score")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available")

    @field_validator("batch_size")
    @classmethod
    def _both_modalities(cls, v: dict[str, int]) -> dict[str, int]:
        for m in ("ct", "mr"):
            if v.get(m, 0) < 1:
                raise ValueError(f"batch_size.{m} must be a positive integer")
        return v


class EvalConfig(_Strict):
    """Sliding-window inference used for validation, evaluation and the deployed model."""

    sw_overlap: float = Field(0.5, ge=0.0, lt=1.0, description="sliding-window overlap")
    sw_mode: Literal["gaussian", "constant"] = Field("gaussian", description="blending of overlapping windows")
    sw_batch_size: int = Field(2, ge=1, description="windows per forward pass")


class TrackingConfig(_Strict):
    """MLflow tracking and registry."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI; null = $MLFLOW_TRACKING_URI or the embedded SQLite store under mlflow/")
    experiment: str = Field("medmtl", description="MLflow experiment name")
    registered_model: str = Field("medmtl-abdomen", description="name of the registered model")
    log_model: bool = Field(True, description="log the deployable pyfunc model at the end of the run")


class ExperimentConfig(_Strict):
    """A whole experiment: data, preprocessing, model, sharing, weighting, training, evaluation, tracking."""

    name: str = Field("experiment", description="experiment name (run name prefix)")
    seed: int = Field(0, description="seed for splits, sampling, augmentation and initialization")
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sharing: list[SharingConfig] = Field(default_factory=list, description="sharing mechanisms at chosen depths; empty = single-task baseline (independent columns)")
    weighting: WeightingConfig = Field(default_factory=EqualWeightingConfig, description="loss-weighting method (equal or gradnorm) and its hyper-parameters")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _depths_exist(self) -> "ExperimentConfig":
        names = self.model.depth_names
        claimed: dict[str, str] = {}
        for i, mech in enumerate(self.sharing):
            depths = names if mech.depths == "all" else list(mech.depths)
            for d in depths:
                if d not in names:
                    raise ValueError(f"sharing.{i}.depths: unknown depth {d!r}; {DEPTH_NAMES_HELP} (here: {', '.join(names)})")
                # Two mechanisms that both own a stage's parameters would silently override each other.
                owner = claimed.get(d)
                if mech.kind in ("hard", "shared_kernels"):
                    if owner is not None:
                        raise ValueError(f"sharing.{i}.depths: depth {d!r} already shared by sharing.{owner}")
                    claimed[d] = f"{i} ({mech.kind})"
        if self.weighting.method == "gradnorm" and self.weighting.depth not in names:
            raise ValueError(f"weighting.depth: unknown depth {self.weighting.depth!r}; {DEPTH_NAMES_HELP} (here: {', '.join(names)})")
        return self

    @property
    def mixes_activations(self) -> bool:
        """True when a unit mixes the columns' activations (each batch then runs through both columns)."""
        return any(m.kind == "cross_stitch" for m in self.sharing)


# ------------------------------------------------------------------------------------------ loading
def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `medmtl config show` lists every key)"
        lines.append((f"  {key}: " if key else "  ") + msg + (f" (got {e['input']!r})" if e["type"] not in ("extra_forbidden", "missing") and not isinstance(e.get("input"), dict) else ""))
    return "\n".join(lines)


_UNION_TAGS = {"soft", "cross_stitch", "hard", "shared_kernels", "equal", "gradnorm"}


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
                    raise ConfigError(f"override {item!r}: {where} is not an index of the list at {'.'.join(parts[:j]) or '<root>'}")
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
