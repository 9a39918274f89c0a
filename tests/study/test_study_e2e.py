"""`medmtl study` and `medmtl sweep` end to end on the tiny data: a worker killed mid-cell, a re-run that trains
no cell twice, the report and the parent run; two sweep trials and the best config they print."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from medmtl.cli import main
from medmtl.config import validate_config
from medmtl.study.cells import expand_cells
from medmtl.study.spec import load_study_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
pytestmark = pytest.mark.slow

FAST = ["tracking.log_model=false", "tracking.overlay_cases=0", "tracking.system_metrics=false"]


def _env(uri: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=uri)


def test_killed_study_resumes_and_trains_no_cell_twice(tiny_dataset, tmp_path, monkeypatch):
    data_dir, _ = tiny_dataset
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "name": "tiny", "base": str(TINY), "heartbeat_s": 1, "grace_s": 3, "bootstrap": 200,
        "overrides": [*FAST, "train.steps=8", "train.checkpoint_every=2", "train.val_every=8", "data.test_fraction=0.34"],
        "datasets": {"d": {"root": str(data_dir)}},
        "variants": {"single_task": {"sharing": []}, "hard": {"sharing": [{"kind": "hard"}]}},
        "weighting": {"equal": {"method": "equal"}}, "seeds": [0, 1],
    }))
    cells = expand_cells(load_study_spec(study), study)
    folder = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "medmtl.cli", "study", str(study)]
    proc = subprocess.Popen(cmd, env=_env(uri), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill -9 the worker once some cell has written its first checkpoint and before that cell ends
    deadline = time.time() + 300
    while not list(folder.glob("cells/*/*/last.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = [p.parent.parent for p in folder.glob("cells/*/*/last.pt") if not (p.parent.parent / "result.json").exists()]
    assert killed, "the worker was to be killed in the middle of a cell"
    killed_run = next(killed[0].glob("*/last.pt")).parent.name
    finished_before = {p.parent.name: json.loads(p.read_text())["run_id"] for p in folder.glob("cells/*/result.json")}

    done = subprocess.run(cmd, env=_env(uri), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    q = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'optuna.db'}")
    parent = q.user_attrs["mlflow_parent_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    by_cell: dict[str, list] = {}
    for r in children:
        by_cell.setdefault(r.data.tags["medmtl.cell"], []).append(r)
    # every cell: exactly one child run, finished; one COMPLETE trial
    assert set(by_cell) == {c.key for c in cells}
    assert all(len(rs) == 1 and rs[0].info.status == "FINISHED" for rs in by_cell.values())
    complete = [t for t in q.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["cell"] for t in complete) == sorted(c.key for c in cells)
    # the killed cell went on in the same run from its checkpoint (the killed trial FAIL, its retry COMPLETE)
    assert by_cell[killed[0].name][0].info.run_id == killed_run
    history = client.get_metric_history(killed_run, "loss/ct")
    assert sorted(m.step for m in history) == list(range(1, 9))  # each step logged once: nothing trained twice
    # cells finished before the kill kept their runs
    assert {k: by_cell[k][0].info.run_id for k in finished_before} == finished_before
    # the report and the parent run
    report = (folder / "report.md").read_text()
    assert "| d | all | hard | equal | 2 |" in report
    assert "delta_m" in client.get_run(parent).data.tags["mlflow.note.content"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent, "report")} >= {"report/report.md", "report/delta_m.png", "report/dice_per_organ.png"}
    # a third run finds everything done and trains nothing
    again = subprocess.run(cmd, env=_env(uri), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 newly enqueued" in again.stdout
    assert len(client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")) == len(cells)


def test_sweep_runs_trials_as_child_runs_and_prints_the_best_config(tiny_dataset, tmp_path, monkeypatch, capsys):
    data_dir, _ = tiny_dataset
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "tiny-sweep", "base": str(TINY), "trials": 2, "startup_trials": 1,
        "overrides": [*FAST, f"data.root={data_dir}", "train.steps=4", "train.val_every=2"],
        "space": {"sharing.0.depths.enc0": {"low": 1e-5, "high": 1e-1, "log": True},
                  "sharing.1.init": {"low": 0.5, "high": 0.99, "as_mixing": True},
                  "sharing.1.lr_multiplier": {"low": 1.0, "high": 100.0, "log": True},
                  "weighting.alpha": {"low": 0.5, "high": 3.0}},
    }))
    out = tmp_path / "best.yaml"
    assert main(["sweep", str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    study = optuna.load_study(study_name="tiny-sweep", storage=f"sqlite:///{tmp_path / 'tiny-sweep' / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # validation Dice was reported during training (steps 2 and 4) for the pruner
    assert all(sorted(t.intermediate_values) == [2, 4] for t in trials)
    best = study.best_trial
    cfg = validate_config(yaml.safe_load(out.read_text()))
    assert out.read_text() in printed
    assert cfg.sharing[0].depths["enc0"] == pytest.approx(best.params["sharing.0.depths.enc0"])
    a = best.params["sharing.1.init"]
    assert [v for row in cfg.sharing[1].init for v in row] == pytest.approx([a, 1 - a, 1 - a, a])
    assert cfg.weighting.alpha == pytest.approx(best.params["weighting.alpha"])
    client = MlflowClient(tracking_uri=uri)
    parent = study.user_attrs["mlflow_parent_run_id"]
    kids = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.data.tags["medmtl.sweep.trial"] for r in kids) == ["0", "1"]
