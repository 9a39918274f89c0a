"""Study and sweep files: the declared schema of ``medmtl study STUDY.yaml`` and ``medmtl sweep SWEEP.yaml``.

A study is a matrix over one base experiment config: sharing variants x weighting methods x seeds x
label budgets x data sets. Each factor level is a named patch of the base config; ``matrix`` says which
combinations run (by default all of them), so that e.g. GradNorm can be crossed with two mechanisms only.
A sweep searches a space of config keys with Optuna. Paths in either file are taken relative to the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from medmtl.config import ConfigError, _format_validation_error, _Strict

__all__ = ["SynthSpec", "DatasetSpec", "ClaimSpec", "StudySpec", "SweepParam", "SweepSpec", "load_study_spec", "load_sweep_spec", "FACTORS"]

FACTORS = ("dataset", "budget", "variant", "weighting", "seed")


class SynthSpec(_Strict):
    """A synthetic data set the study writes (synth + ingest) when its folder holds no manifest yet."""

    n_ct: int = Field(10, ge=3, description="CT patients")
    n_mr: int = Field(10, ge=3, description="MR patients (a different set)")
    seed: int = Field(0, description="seed of anatomy, intensities, fake PHI and UIDs")
    relatedness: float = Field(1.0, ge=0.0, le=1.0, description="MR anatomy from the CT distribution (1) or a conflicting one (0); see `medmtl synth --relatedness`")
    ct_matrix: int = Field(96, ge=16, description="rows and columns of the CT series")
    mr_matrix: int = Field(80, ge=16, description="rows and columns of the MR series")


class DatasetSpec(_Strict):
    """One data set of the study: an ingested DATA_DIR, or one the study synthesizes."""

    root: str | None = Field(None, description="DATA_DIR written by `medmtl ingest`; null = <study folder>/data/<name>/data, synthesized from `synth`")
    synth: SynthSpec | None = Field(None, description="how to synthesize the data set when its folder holds no manifest.jsonl")
    description: str = Field("", description="one line shown in the report")

    @model_validator(mode="after")
    def _root_or_synth(self) -> "DatasetSpec":
        if self.root is None and self.synth is None:
            raise ValueError("give `root` (an ingested DATA_DIR) or `synth` (a synthetic data set to write)")
        return self


class ClaimSpec(_Strict):
    """A claim the study tests; the report says met, not met or not tested, with the numbers."""

    text: str = Field(..., description="the claim in words")
    kind: Literal["best_above", "negative", "not_negative"] = Field(..., description="best_above: the best listed variant's delta_m > threshold with its interval above 0; negative: some listed variant's interval is entirely below 0; not_negative: none is")
    dataset: str = Field(..., description="data set of the condition")
    budget: str = Field(..., description="label budget of the condition")
    variants: list[str] | None = Field(None, description="variants the claim is about; null = all")
    threshold: float = Field(0.0, description="delta_m threshold in percent (best_above)")


class StudySpec(_Strict):
    """A study: the matrix of cells over a base config, where they are coordinated, and what the report compares."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="study name (Optuna study name, MLflow parent run name)")
    base: str = Field(..., description="base experiment YAML (relative to the study file)")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value overrides applied to the base config for every cell")
    profiles: dict[Literal["cpu", "cuda"], list[str]] = Field(default_factory=dict, description="more overrides by the device the study runs on (`--profile`, default cuda when a GPU is present, else cpu): e.g. a small model and few steps on CPU, the base's full size on GPUs")
    out_dir: str | None = Field(None, description="study folder (cells, checkpoints, report); null = <study file folder>/<name>")
    storage: str | None = Field(None, description="Optuna storage URL shared by all workers (sqlite:///..., postgresql://..., mysql://...); null = SQLite in the study folder")
    heartbeat_s: int = Field(30, ge=1, description="each worker records a heartbeat this often (seconds) for the cell it trains")
    grace_s: int = Field(120, ge=2, description="a running cell without a heartbeat this long (seconds) counts as lost: its worker died, the cell goes back to the queue")
    max_retry: int = Field(3, ge=0, description="times a lost cell is handed out again")
    datasets: dict[str, DatasetSpec] = Field(..., min_length=1, description="name -> data set")
    variants: dict[str, dict[str, Any]] = Field(..., min_length=1, description="name -> partial config merged into the base (e.g. {sharing: [{kind: hard}]})")
    weighting: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"equal": {"method": "equal"}}, description="name -> weighting section (replaces the base's)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="seeds (split, initialization, sampling)")
    budgets: dict[str, dict[str, int]] = Field(default_factory=lambda: {"all": {}}, description="name -> data.label_budget (e.g. {mr: 3}); {} = all training cases")
    matrix: list[dict[str, list[str] | Literal["all"]]] = Field(default_factory=lambda: [{}], description="blocks of the matrix: factor (dataset, budget, variant, weighting, seed) -> names or 'all' (missing = all); cells are the union of the blocks' products")
    baseline: str = Field("single_task", description="variant every other is compared with (delta_m)")
    baseline_weighting: str | None = Field(None, description="weighting of the baseline cells; null = the first weighting")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples (over seeds, then test cases) for the 95% intervals")
    claims: list[ClaimSpec] = Field(default_factory=list, description="claims the report checks against the numbers")
    notes: str = Field("", description="Markdown put at the top of the report (what was run, at which scale); the findings themselves are computed")
    page: str | None = Field(None, description="also write the report to this Markdown file (relative to the study file), pictures beside it (e.g. ../docs/results.md)")

    @field_validator("matrix")
    @classmethod
    def _factors_known(cls, v: list[dict]) -> list[dict]:
        for i, block in enumerate(v):
            for k in block:
                if k not in FACTORS:
                    raise ValueError(f"matrix.{i}: unknown factor {k!r}; factors are {', '.join(FACTORS)}")
        return v

    @model_validator(mode="after")
    def _names_known(self) -> "StudySpec":
        levels = self.levels()
        for i, block in enumerate(self.matrix):
            for k, names in block.items():
                for n in [] if names == "all" else names:
                    if str(n) not in levels[k]:
                        raise ValueError(f"matrix.{i}.{k}: unknown name {n!r}; known: {', '.join(levels[k])}")
        if self.baseline not in self.variants:
            raise ValueError(f"baseline: {self.baseline!r} is not a variant; known: {', '.join(self.variants)}")
        if self.baseline_weighting is not None and self.baseline_weighting not in self.weighting:
            raise ValueError(f"baseline_weighting: {self.baseline_weighting!r} is not a weighting; known: {', '.join(self.weighting)}")
        return self

    def levels(self) -> dict[str, list[str]]:
        """Factor -> its level names (seeds as strings)."""
        return {"dataset": list(self.datasets), "budget": list(self.budgets), "variant": list(self.variants),
                "weighting": list(self.weighting), "seed": [str(s) for s in self.seeds]}

    @property
    def reference_weighting(self) -> str:
        """The baseline cells' weighting."""
        return self.baseline_weighting or next(iter(self.weighting))


class SweepParam(_Strict):
    """One searched config key: a float or int range (optionally log scale) or a list of choices."""

    type: Literal["float", "int", "categorical"] = Field("float", description="what Optuna suggests")
    low: float | None = Field(None, description="lower bound (float, int)")
    high: float | None = Field(None, description="upper bound (float, int)")
    log: bool = Field(False, description="sample on a log scale (lambda per depth, learning rates)")
    choices: list[Any] | None = Field(None, description="values of a categorical parameter")
    as_mixing: bool = Field(False, description="the suggested float a is written as the 2x2 mixing init [[a, 1-a], [1-a, a]] (cross-stitch, sluice)")

    @model_validator(mode="after")
    def _bounds(self) -> "SweepParam":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs `choices`")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("a float or int parameter needs low < high")
        elif self.log and self.low <= 0:
            raise ValueError("a log-scale parameter needs low > 0")
        return self


class SweepSpec(_Strict):
    """A sweep: Optuna TPE with a median pruner over config keys of a base config, scored by validation Dice."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="sweep name (Optuna study name, MLflow parent run name)")
    base: str = Field(..., description="base experiment YAML (relative to the sweep file)")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value overrides applied to the base config of every trial")
    out_dir: str | None = Field(None, description="sweep folder; null = <sweep file folder>/<name>")
    storage: str | None = Field(None, description="Optuna storage URL (sqlite:///..., postgresql://...); null = SQLite in the sweep folder")
    trials: int = Field(20, ge=1, description="trials this invocation runs (several machines may run the same sweep)")
    space: dict[str, SweepParam] = Field(..., min_length=1, description="dotted config key (as in overrides, e.g. sharing.0.depths.enc1) -> its range")
    sampler_seed: int = Field(0, description="seed of the TPE sampler")
    startup_trials: int = Field(5, ge=0, description="random trials before TPE models the space (TPE n_startup_trials)")
    pruner_startup_trials: int = Field(3, ge=0, description="trials that run to the end before the median pruner may stop any")
    pruner_warmup_steps: int = Field(0, ge=0, description="training steps before a trial may be pruned")


def _load(path: str | Path, model: type, what: str):
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file {p} not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} file {p} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid {what} file {p}: the top level must be a mapping of keys")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(p))) from None


def load_study_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file (errors name the file and key)."""
    return _load(path, StudySpec, "study")


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file (errors name the file and key)."""
    return _load(path, SweepSpec, "sweep")
