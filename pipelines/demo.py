"""The thin path end to end: synthetic exports -> ingest -> train -> evaluate -> MLflow -> registry."""

from __future__ import annotations

import shutil
from pathlib import Path

from medmtl.config import ExperimentConfig
from medmtl.ingest.run import ingest
from medmtl.synth import synthesize_exports
from medmtl.tracking.registry import register_run_model
from medmtl.tracking.store import ui_command
from pipelines.train import run_training


def run_demo(cfg: ExperimentConfig, *, workdir: str | Path = "demo_data", n_ct: int = 10, n_mr: int = 10, seed: int = 0,
             fresh: bool = False, progress: bool = True, echo=print) -> dict:
    """Run the whole demo; ``cfg.data.root`` is replaced by ``workdir/data``. Returns ids and scores."""
    workdir = Path(workdir)
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    synth_dir = workdir / "synth"
    if not (synth_dir / "export").exists():
        echo(f"[1/4] synthesizing {n_ct} CT and {n_mr} MR exports (seed {seed}) in {synth_dir}")
        synthesize_exports(synth_dir, n_ct=n_ct, n_mr=n_mr, seed=seed, progress=progress)
    else:
        echo(f"[1/4] reusing synthetic exports in {synth_dir}")
    data_dir = workdir / "data"
    echo(f"[2/4] ingesting {synth_dir / 'export'} -> {data_dir}")
    report = ingest(synth_dir / "export", data_dir, labels_dir=synth_dir / "labels", progress=progress, label_names=cfg.data.labels)
    echo(report.summary())
    cfg = cfg.model_copy(deep=True)
    cfg.data.root = str(data_dir)
    echo(f"[3/4] training {cfg.name}: {cfg.train.steps} steps, sharing: {', '.join(m.kind for m in cfg.sharing) or 'none'}")
    result = run_training(cfg, out_dir=workdir / "runs", progress=progress)
    echo("[4/4] registering the model")
    version = register_run_model(tracking_uri=result.tracking_uri, run_id=result.run_id, name=cfg.tracking.registered_model,
                                 model_uri=result.model_uri)
    echo("")
    echo(result.summary().replace(result.links.text(), "").rstrip())
    echo(f"registered model: {version.name} version {version.version} (alias challenger)")
    echo(f"model URI:        models:/{version.name}@challenger")
    echo(f"open the UI:      {ui_command(result.tracking_uri)}")
    echo(version.links.text())
    return {"run_id": result.run_id, "model_name": version.name, "version": version.version, "test_dice": result.test_dice,
            "val_dice": result.val_dice, "tracking_uri": result.tracking_uri, "links": version.links}
