"""Run a sweep: Optuna proposes -> a child run trains and reports validation Dice -> prune or tell -> best config."""

from __future__ import annotations

from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from medmtl.config import ConfigError
from medmtl.study.runs import ensure_parent_run, finish_parent
from medmtl.study.spec import load_sweep_spec
from medmtl.study.sweep import PruningReporter, best_config_yaml, load_base, open_sweep, suggest_overrides, trial_config
from medmtl.tracking.store import resolve_tracking_uri
from pipelines.train import run_training


def run_sweep(spec_path: str | Path, *, trials: int | None = None, storage: str | None = None) -> str:
    """Run ``trials`` trials of the sweep (joining trials other machines run on the same storage); returns the best config YAML."""
    spec_path = Path(spec_path)
    spec = load_sweep_spec(spec_path)
    here = spec_path.resolve().parent
    folder = (here / spec.out_dir).resolve() if spec.out_dir else here / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    base_raw = load_base(spec, spec_path)
    base_cfg = trial_config(base_raw, [], name=spec.name, source=str(spec_path))
    url = storage or spec.storage or f"sqlite:///{folder / 'optuna.db'}"
    study = open_sweep(spec, url)
    parent = ensure_parent_run(study, base_cfg, name=spec.name, kind="sweep")
    for _ in range(trials if trials is not None else spec.trials):
        trial = study.ask()
        overrides = suggest_overrides(trial, spec.space)
        try:
            cfg = trial_config(base_raw, overrides, name=f"{spec.name}.t{trial.number}", source=str(spec_path))
        except ConfigError as err:  # a combination the schema refuses: a failed trial, not a failed sweep
            print(f"trial {trial.number}: invalid config: {err}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        reporter = PruningReporter(trial)
        out = folder / "trials" / str(trial.number)
        tags = {"mlflow.parentRunId": parent, "medmtl.sweep": spec.name, "medmtl.sweep.trial": str(trial.number)}
        try:
            run_training(cfg, out_dir=out, tags=tags, on_validation=reporter, progress=False)
        except optuna.TrialPruned as why:
            _mark_pruned(cfg, out, str(why))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            print(f"trial {trial.number}: pruned ({why})")
            continue
        study.tell(trial, reporter.last if reporter.last is not None else 0.0)
        print(f"trial {trial.number}: validation Dice {reporter.last:.4f}  {' '.join(overrides)}")
    best = best_config_yaml(spec, study, base_raw, source=str(spec_path))
    path = folder / "best.yaml"
    path.write_text(best)
    b = study.best_trial
    finish_parent(base_cfg, parent, description=f"best trial {b.number}: validation Dice {b.value:.4f}\n\n" + "\n".join(
        f"- `{k}` = {v}" for k, v in b.params.items()), files=[path])
    return best


def _mark_pruned(cfg, out: Path, why: str) -> None:
    """A pruned trial's run ends KILLED (not FAILED) with the reason as a tag."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri)[0])
    for d in out.iterdir() if out.is_dir() else []:
        if d.is_dir():
            client.set_terminated(d.name, status="KILLED")
            client.set_tag(d.name, "medmtl.pruned", why)
