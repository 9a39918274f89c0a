"""Hyper-parameter sweeps with Optuna: TPE sampling, median pruning on validation Dice reported during training.

The search space names config keys exactly as overrides do (``sharing.0.depths.enc1``, ``sharing.1.lr_multiplier``,
``weighting.alpha``); a trial is the base config with the suggested values applied, trained as an MLflow child run
of the sweep's parent run. At each periodic validation the trial reports the model-selection score (mean over
modalities of the mean Dice) to Optuna; the median pruner stops a trial whose score is below the median of the
earlier trials at the same step. The best trial comes back as a complete, validated config file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import yaml

from medmtl.config import ConfigError, ExperimentConfig, apply_overrides, config_to_yaml, validate_config
from medmtl.study.queue import open_storage
from medmtl.study.spec import SweepParam, SweepSpec

__all__ = ["open_sweep", "suggest_overrides", "overrides_from_params", "PruningReporter", "best_config_yaml", "trial_config", "load_base"]


def open_sweep(spec: SweepSpec, url: str) -> optuna.Study:
    """The sweep's Optuna study (created or joined): TPE sampler and median pruner as the spec says."""
    sampler = optuna.samplers.TPESampler(seed=spec.sampler_seed, n_startup_trials=spec.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup_trials, n_warmup_steps=spec.pruner_warmup_steps)
    return optuna.create_study(study_name=spec.name, storage=open_storage(url), sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


def _value(p: SweepParam, v: Any) -> Any:
    return [[v, 1.0 - v], [1.0 - v, v]] if p.as_mixing else v


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: the override parser reads lists and numbers back exactly


def suggest_overrides(trial: optuna.Trial, space: dict[str, SweepParam]) -> list[str]:
    """Ask ``trial`` for a value of every key in ``space``; returns them as ``key=value`` overrides."""
    out = []
    for key, p in space.items():
        if p.type == "float":
            v = trial.suggest_float(key, p.low, p.high, log=p.log)
        elif p.type == "int":
            v = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        else:
            v = trial.suggest_categorical(key, p.choices)
        out.append(_override(key, _value(p, v)))
    return out


def overrides_from_params(params: dict[str, Any], space: dict[str, SweepParam]) -> list[str]:
    """The overrides of a finished trial's ``params`` (as :func:`suggest_overrides` made them)."""
    return [_override(k, _value(space[k], params[k])) for k in space if k in params]


class PruningReporter:
    """``on_validation`` hook of a trial: report the validation score, raise ``TrialPruned`` when the pruner says so."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.last: float | None = None

    def __call__(self, step: int, evaluation) -> None:
        """Report the mean over modalities of the mean validation Dice at ``step``."""
        vals = [d["mean"] for d in evaluation.mean_dice.values() if d["mean"] == d["mean"]]
        self.last = float(sum(vals) / len(vals)) if vals else 0.0
        self.trial.report(self.last, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"validation Dice {self.last:.4f} at step {step} is below the median of earlier trials")


def trial_config(base_raw: dict, overrides: list[str], *, name: str, source: str) -> ExperimentConfig:
    """The validated config of a trial: the base with the suggested overrides."""
    return validate_config(apply_overrides(base_raw, [*overrides, f"name={name}"]), f"{source} with {' '.join(overrides)}")


def best_config_yaml(spec: SweepSpec, study: optuna.Study, base_raw: dict, *, source: str) -> str:
    """The best complete trial as a ready config file, with a header naming the trial and its score."""
    best = study.best_trial
    overrides = overrides_from_params(best.params, spec.space)
    cfg = trial_config(base_raw, overrides, name=f"{spec.name}-best", source=source)
    head = [f"# best trial of sweep {spec.name}: number {best.number}, validation Dice {best.value:.4f}",
            *[f"#   {o}" for o in overrides]]
    return "\n".join(head) + "\n" + config_to_yaml(cfg)


def load_base(spec: SweepSpec, spec_path: str | Path) -> dict:
    """The base config of a sweep as a raw mapping, the sweep's overrides applied."""
    base = Path(spec_path).resolve().parent / spec.base
    if not base.is_file():
        raise ConfigError(f"{spec_path}: base: config file {base} not found")
    raw = yaml.safe_load(base.read_text()) or {}
    return apply_overrides(raw, spec.overrides) if spec.overrides else raw
