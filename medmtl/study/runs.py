"""The MLflow side of a study or sweep: one parent run, cells as child runs, results read back from MLflow.

A cell's child run carries ``mlflow.parentRunId`` and ``medmtl.cell`` (its key) from the moment it is
created, so a killed cell's run is found again; its checkpoints live in ``<study>/cells/<key>/<run_id>/``.
A re-started cell resumes from the newest ``last.pt`` there (same MLflow run, exact resume); a cell that
died before its first checkpoint starts over, and its orphaned run is closed as KILLED.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient

from medmtl.config import ExperimentConfig
from medmtl.study.cells import Cell
from medmtl.study.report import CellResult
from medmtl.tracking.store import ensure_experiment, resolve_tracking_uri

__all__ = ["PARENT_ATTR", "ensure_parent_run", "train_cell", "collect_results", "finish_parent", "count_parameters"]

PARENT_ATTR = "mlflow_parent_run_id"


def _client(cfg: ExperimentConfig) -> tuple[MlflowClient, str]:
    uri, artifact_root = resolve_tracking_uri(cfg.tracking.tracking_uri)
    return MlflowClient(tracking_uri=uri), ensure_experiment(cfg.tracking.experiment, uri, artifact_root)


def ensure_parent_run(study, cfg: ExperimentConfig, *, name: str, kind: str) -> str:
    """The parent run id stored in the Optuna study's attributes, created (and stored) on first use."""
    client, exp = _client(cfg)
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id is None:
        run_id = client.create_run(exp, run_name=f"{kind}:{name}", tags={"medmtl.kind": kind, f"medmtl.{kind}": name}).info.run_id
        study.set_user_attr(PARENT_ATTR, run_id)
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


def cell_tags(cell: Cell, parent: str, study: str) -> dict[str, str]:
    """Tags of a cell's child run: parent, study, key and factor levels."""
    return {"mlflow.parentRunId": parent, "medmtl.study": study, "medmtl.cell": cell.key,
            **{f"medmtl.cell.{k}": v for k, v in cell.factors.items()}}


def train_cell(cell: Cell, folder: Path, *, parent: str, study: str, train: Callable, log: Callable[[str], None] = print) -> float:
    """Train (or resume) one cell with ``train`` (the training pipeline); returns its mean test Dice over modalities."""
    cdir = folder / "cells" / cell.key
    cdir.mkdir(parents=True, exist_ok=True)
    lasts = sorted(cdir.glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
    tags = cell_tags(cell, parent, study)
    if lasts:
        log(f"  resuming {cell.label} from {lasts[-1]}")
        res = train(cell.cfg, out_dir=cdir, resume=lasts[-1], tags=tags, progress=False)
    else:
        client, exp = _client(cell.cfg)
        # a run of this cell whose worker died before its first checkpoint: nothing to resume, close it
        for r in client.search_runs([exp], filter_string=f"tags.`medmtl.cell` = '{cell.key}' and attributes.status = 'RUNNING' "
                                                         f"and tags.`mlflow.parentRunId` = '{parent}'"):
            client.set_terminated(r.info.run_id, status="KILLED")
        res = train(cell.cfg, out_dir=cdir, tags=tags, progress=False)
    (cdir / "result.json").write_text(json.dumps({"run_id": res.run_id, "test_dice": res.test_dice}, indent=1))
    vals = [d["mean"] for d in res.test_dice.values() if not math.isnan(d["mean"])]
    return float(sum(vals) / len(vals)) if vals else 0.0


def count_parameters(cfg: ExperimentConfig) -> int:
    """Parameters of the network a config builds (shared modules counted once)."""
    from medmtl.models.two_column import TwoColumnNet

    return sum(p.numel() for p in TwoColumnNet(cfg=cfg).parameters())


def collect_results(cells: list[Cell], *, parent: str) -> tuple[list[CellResult], list[str]]:
    """Finished child runs of ``parent`` for ``cells`` as :class:`CellResult`; and the labels of cells without one."""
    if not cells:
        return [], []
    client, exp = _client(cells[0].cfg)
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'FINISHED'",
                              max_results=50000)
    by_cell = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        by_cell[r.data.tags.get("medmtl.cell")] = r
    params: dict[str, int] = {}
    out, missing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for cell in cells:
            r = by_cell.get(cell.key)
            if r is None:
                missing.append(cell.label)
                continue
            path = client.download_artifacts(r.info.run_id, "evaluation/test_dice.json", tmp)
            per_case = json.loads(Path(path).read_text())["per_case"]
            arch = cell.variant
            if arch not in params:
                params[arch] = count_parameters(cell.cfg)
            out.append(CellResult(factors=cell.factors, run_id=r.info.run_id, per_case=per_case,
                                  classes={m: list(cell.cfg.data.labels[m].values()) for m in ("ct", "mr")},
                                  step_seconds=float(r.data.metrics.get("train/step_seconds", math.nan)), parameters=params[arch]))
    return out, missing


def finish_parent(cfg: ExperimentConfig, parent: str, *, description: str, files: list[Path], artifact_path: str = "report",
                  complete: bool = True) -> None:
    """Log the report files to the parent run, show ``description`` on its page, end it FINISHED (or leave it running)."""
    client, _ = _client(cfg)
    for f in files:
        client.log_artifact(parent, str(f), artifact_path=artifact_path)
    client.set_tag(parent, "mlflow.note.content", description)
    if complete:
        client.set_terminated(parent, status="FINISHED")
