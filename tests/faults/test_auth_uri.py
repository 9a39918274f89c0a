"""A login put in the tracking URI is refused before MLflow (or the run, or the spool) sees it.

Before the fix: ``MLFLOW_TRACKING_URI=http://alice:PASSWORD@host`` was handed to MLflow, which prints
"View run ... at: http://alice:PASSWORD@host/..." on the terminal, and with the server down the error
message printed the password too ("cannot start an MLflow run at http://alice:PASSWORD@..."); a password
in ``tracking.tracking_uri`` went into the run's params and ``config.yaml``. Reverting the check in
``medmtl.tracking.store.resolve_tracking_uri`` makes every test here fail but the one that keeps a
database URI in the environment allowed (checked: 4 of 5 fail; the run start is then tried against the
closed port and MLflow's error carries ``http://alice:PASSWORD@...``). No server is needed: the URIs point
at a port nobody listens on, and the refusal comes before any request.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from medmtl.config import load_config
from medmtl.errors import TrackingError
from medmtl.tracking.spool import replay_spool
from medmtl.tracking.store import resolve_tracking_uri

PASSWORD = "alice-secret-password"
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_mlflow_env(monkeypatch):
    """No MLflow settings from the caller's environment; requests bounded, should any be made."""
    import os

    for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


@pytest.mark.parametrize("where", ["MLFLOW_TRACKING_URI", "tracking.tracking_uri"])
def test_train_refuses_a_login_in_the_uri_before_any_run_exists(where, tiny_dataset, tmp_path, monkeypatch, no_mlflow_env):
    from pipelines.train import run_training

    bare = f"http://127.0.0.1:{closed_port()}"
    uri = bare.replace("http://", f"http://alice:{PASSWORD}@")
    data_dir, _ = tiny_dataset
    overrides = [f"data.root={data_dir}", "tracking.http_max_retries=0", "tracking.http_timeout_s=2"]
    if where == "MLFLOW_TRACKING_URI":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    else:
        overrides.append(f"tracking.tracking_uri={uri}")
    cfg = load_config(TINY_CONFIG, overrides)
    with pytest.raises(TrackingError) as err:
        run_training(cfg, out_dir=tmp_path / "runs", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and PASSWORD not in msg and "alice" not in msg
    assert f"{where} carries a user name and password" in msg and f"use {bare}" in msg
    assert "MLFLOW_TRACKING_USERNAME" in msg and "MLFLOW_TRACKING_PASSWORD" in msg
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))  # no spool, no checkpoint


def test_config_key_refuses_a_database_password_that_would_be_logged(no_mlflow_env):
    with pytest.raises(TrackingError, match="tracking.tracking_uri carries a password") as err:
        resolve_tracking_uri(f"postgresql://mlflow:{PASSWORD}@db.internal:5432/mlflow")
    assert PASSWORD not in str(err.value) and "MLFLOW_TRACKING_URI environment variable" in str(err.value)


def test_environment_may_hold_a_database_uri_with_its_password(no_mlflow_env, monkeypatch):
    # MLflow prints no URL for a database store, and the environment is not logged: the only way to log in
    uri = f"postgresql://mlflow:{PASSWORD}@db.internal:5432/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert resolve_tracking_uri(None) == (uri, None)


def test_sync_refuses_a_login_in_the_uri(tmp_path, no_mlflow_env):
    with pytest.raises(TrackingError, match="--tracking-uri carries a user name and password") as err:
        replay_spool(tmp_path / "runs" / "x" / "mlflow_spool", f"http://alice:{PASSWORD}@127.0.0.1:{closed_port()}")
    assert PASSWORD not in str(err.value)
