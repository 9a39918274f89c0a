"""Where runs go: a tracking server from ``MLFLOW_TRACKING_URI`` / the config, or the embedded store.

The embedded default is a SQLite database and an artifact folder under ``mlflow/`` (MLflow 3.x refuses
the plain file store). The database is created once, here, before any worker or rank starts, since
two processes racing to create a fresh database fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

__all__ = ["resolve_tracking_uri", "embedded_store", "ensure_experiment", "ui_command"]

DEFAULT_STORE_DIR = Path("mlflow")


def embedded_store(root: str | Path = DEFAULT_STORE_DIR) -> tuple[str, str]:
    """``(tracking_uri, artifact_root_uri)`` of the embedded SQLite store under ``root``."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def resolve_tracking_uri(configured: str | None) -> tuple[str, str | None]:
    """``(tracking_uri, artifact_root or None)``: config value, else ``$MLFLOW_TRACKING_URI``, else embedded."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    return embedded_store()


def ensure_experiment(name: str, tracking_uri: str, artifact_root: str | None) -> str:
    """Create (once) or look up the experiment; returns its id. Also initializes a fresh SQLite database."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=f"{artifact_root}/{name}" if artifact_root else None)


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store (on 127.0.0.1)."""
    if tracking_uri.startswith("sqlite:"):
        root = Path(tracking_uri[len("sqlite:///"):]).parent
        return f"mlflow ui --backend-store-uri {tracking_uri} --default-artifact-root {(root / 'artifacts').as_uri()} --host 127.0.0.1 --port 5000"
    return f"open {tracking_uri} in a browser"
