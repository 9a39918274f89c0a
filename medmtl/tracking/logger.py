"""Run logging to MLflow, batched: metric points are buffered and sent with ``log_batch``.

Training never sends one synchronous request per metric point; the buffer is flushed every
``flush_every`` points and at the end of the run.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

__all__ = ["RunLogger", "NullLogger"]

_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request


class NullLogger:
    """Logger that records nothing (ranks other than 0, tests)."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Ignore."""

    def flush(self) -> None:
        """Ignore."""


class RunLogger:
    """One MLflow run: buffered metrics, params, tags, artifacts."""

    def __init__(self, *, tracking_uri: str, experiment_id: str, run_name: str, tags: dict[str, str] | None = None, flush_every: int = 500) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        self.run_id = run.info.run_id
        self.flush_every = flush_every
        self._buffer: list[Metric] = []
        self.points_logged = 0

    def log_params(self, params: dict[str, Any]) -> None:
        """Params in batches (values are strings of at most 6000 characters in MLflow)."""
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags in one request."""
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer metric points (non-finite values are kept: MLflow stores NaN and inf)."""
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            v = float(v)
            self._buffer.append(Metric(_clean(k), v if math.isfinite(v) or math.isnan(v) else float(v), ts, step))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Send every buffered point."""
        while self._buffer:
            chunk, self._buffer = self._buffer[:_MAX_BATCH], self._buffer[_MAX_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)
            self.points_logged += len(chunk)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        """Write ``data`` as JSON and log it as an artifact at ``artifact_file``."""
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / Path(artifact_file).name
            p.write_text(json.dumps(data, indent=2, default=str))
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(p), artifact_path=None if parent == "." else parent)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` as an artifact file."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a local file."""
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Flush and close the run."""
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def _clean(key: str) -> str:
    # MLflow accepts alphanumerics, _ - . space : / only
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)
