"""Fixtures for the tracking tests: one tiny trained run per session, one copied store per test, a real server.

* ``trained``: the tiny config with a test split trained once on the shared ``tiny_dataset`` into an embedded SQLite store
  (artifacts beside it). Tests never write into it; they get a copy of its database (``store``), whose
  artifact URIs still point at the shared, read-only artifact folder.
* ``empty_db``: a freshly migrated, empty SQLite database, made once and copied wherever a test needs a
  new store (a tracking server's backend), so no test pays MLflow's migrations again.
* ``tracking_helpers.MlflowServer``: a real ``mlflow server`` on 127.0.0.1 started through ``mlflow/serve.py`` (one
  worker, job runner off), which a test can stop answering (SIGSTOP), kill (SIGKILL) and restart.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tracking_helpers import TINY_CONFIG


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite database (copy it, never write into it)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty_store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@pytest.fixture(scope="session")
def trained(tiny_dataset, tmp_path_factory, empty_db):
    """The tiny config trained once: ``dict(uri, db, run_id, model_uri, cfg, data_dir, synth, root)``."""
    from medmtl.config import load_config
    from pipelines.train import run_training

    data_dir, synth = tiny_dataset
    root = tmp_path_factory.mktemp("trained")
    shutil.copyfile(empty_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # one training, one validation and one test case per modality: the final scores are test scores
    cfg = load_config(TINY_CONFIG, [f"data.root={data_dir}", f"tracking.tracking_uri={uri}", "tracking.overlay_cases=1",
                                    "data.val_fraction=0.34", "data.test_fraction=0.34",
                                    "tracking.system_metrics_interval_s=0.5"])
    res = run_training(cfg, out_dir=root / "runs", progress=False)
    return {"uri": uri, "db": root / "mlflow.db", "run_id": res.run_id, "model_uri": res.model_uri, "cfg": cfg,
            "data_dir": data_dir, "synth": synth, "root": root, "test_dice": res.test_dice}


@pytest.fixture
def store(trained, tmp_path) -> str:
    """Tracking URI of this test's own copy of the trained store's database."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(trained["db"], db)
    return f"sqlite:///{db}"


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    """Tests (and `medmtl predict` run in-process) set MLflow's process-wide URI; give every test a clean one."""
    import os

    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_global, old_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(old_global)
    if old_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old_env
