"""The cells of a study: one resolved experiment config per combination of factor levels, keyed by its hash.

A cell's key is the SHA-256 of its resolved config (every default filled in) with the data root written as
the study's data-set name, so the same cell has the same key on every machine whatever the path of its
data there, and changing anything that changes training (a variant, a step count, a seed) makes a new cell.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medmtl.config import ConfigError, ExperimentConfig, apply_overrides, config_to_dict, validate_config
from medmtl.study.spec import FACTORS, StudySpec

__all__ = ["Cell", "expand_cells", "default_profile", "cell_key", "study_dir", "dataset_root", "merge"]


@dataclass(frozen=True)
class Cell:
    """One training run of a study: its factor levels, resolved config and key."""

    key: str
    dataset: str
    budget: str
    variant: str
    weighting: str
    seed: int
    cfg: ExperimentConfig

    @property
    def factors(self) -> dict[str, str]:
        """Factor -> level name (for tags and tables)."""
        return {"dataset": self.dataset, "budget": self.budget, "variant": self.variant, "weighting": self.weighting, "seed": str(self.seed)}

    @property
    def label(self) -> str:
        """Human-readable cell name (the MLflow run name)."""
        return f"{self.variant}.{self.weighting}.{self.dataset}.{self.budget}.s{self.seed}"


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in: mappings recursively, everything else (lists included) replaced."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def study_dir(spec: StudySpec, spec_path: str | Path) -> Path:
    """The study folder: ``out_dir`` relative to the study file, or ``<file folder>/<name>``."""
    here = Path(spec_path).resolve().parent
    return (here / spec.out_dir).resolve() if spec.out_dir else here / spec.name


def dataset_root(spec: StudySpec, spec_path: str | Path, name: str) -> Path:
    """Where data set ``name`` lives (its ``root`` relative to the study file, or inside the study folder)."""
    ds = spec.datasets[name]
    if ds.root is not None:
        return (Path(spec_path).resolve().parent / ds.root).resolve()
    return study_dir(spec, spec_path) / "data" / name / "data"


def cell_key(cfg: ExperimentConfig, dataset: str) -> str:
    """16 hex digits of the SHA-256 of the resolved config, the data root replaced by the data-set name (run name left out)."""
    d = config_to_dict(cfg)
    d["data"]["root"] = f"dataset:{dataset}"
    d["name"] = ""  # the run name does not change training
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_profile() -> str:
    """``cuda`` when a GPU is present, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _base_raw(spec: StudySpec, spec_path: Path, profile: str) -> dict[str, Any]:
    base = (spec_path.resolve().parent / spec.base)
    if not base.is_file():
        raise ConfigError(f"{spec_path}: base: config file {base} not found")
    raw = yaml.safe_load(base.read_text()) or {}
    overrides = [*spec.overrides, *spec.profiles.get(profile, [])]
    return apply_overrides(raw, overrides) if overrides else raw


def expand_cells(spec: StudySpec, spec_path: str | Path, profile: str | None = None) -> list[Cell]:
    """Every cell of the matrix (the union of its blocks, each once), validated; errors name the cell.

    ``profile`` (``cpu`` or ``cuda``; default :func:`default_profile`) picks the study's device overrides.
    """
    spec_path = Path(spec_path)
    raw = _base_raw(spec, spec_path, profile or default_profile())
    levels = spec.levels()
    seen: dict[tuple, None] = {}
    for block in spec.matrix:
        chosen = [levels[f] if block.get(f, "all") == "all" else [str(x) for x in block[f]] for f in FACTORS]
        for combo in itertools.product(*chosen):
            seen.setdefault(combo, None)
    cells = []
    for dataset, budget, variant, weighting, seed in seen:
        cfg_raw = merge(raw, spec.variants[variant])
        cfg_raw["weighting"] = copy.deepcopy(spec.weighting[weighting])
        cfg_raw = merge(cfg_raw, {"seed": int(seed), "name": f"{spec.name}.{variant}.{weighting}.{dataset}.{budget}.s{seed}",
                                  "data": {"root": str(dataset_root(spec, spec_path, dataset)), "label_budget": spec.budgets[budget]}})
        where = f"{spec_path} cell variant={variant} weighting={weighting} dataset={dataset} budget={budget} seed={seed}"
        cfg = validate_config(cfg_raw, where)
        if cfg.data.test_fraction <= 0:
            # a study compares final scores on cases never used for training or selection: validation scores would
            # be the ones best.pt was picked on
            raise ConfigError(f"{where}: data.test_fraction is {cfg.data.test_fraction}; a study needs a test split "
                              "(set data.test_fraction > 0 in the base config or the overrides)")
        cells.append(Cell(key=cell_key(cfg, dataset), dataset=dataset, budget=budget, variant=variant, weighting=weighting,
                          seed=int(seed), cfg=cfg))
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        dup = next(c for c in cells if keys.count(c.key) > 1)
        raise ConfigError(f"{spec_path}: two cells resolve to the same config (e.g. {dup.label}); two variants or weightings are identical")
    return cells
