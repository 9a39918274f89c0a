"""Run logging to MLflow that never makes training wait and never loses a point.

Every record (metric points, params, tags, artifacts, the final status) goes into the run's spool,
a write-ahead log on local disk (:mod:`medmtl.tracking.spool`), and a background thread sends it in
batches (``log_batch`` of up to 1000 points), never one request per point. When the tracking server
is unreachable or stops answering, the thread keeps the records on disk and tries again every
``retry_interval_s``; at the end of the run it keeps trying for ``final_sync_timeout_s`` and leaves
whatever is still unsent on disk, with the command that sends it later. HTTP timeouts and retries
are bounded by :func:`~medmtl.tracking.store.apply_http_settings` (MLflow's defaults block for
minutes per request).

The training thread only appends to memory; :meth:`RunLogger.flush` writes to the local spool and
fsyncs it, so "flushed" means "safe on local disk", not "on the server" (:meth:`RunLogger.sync`
waits for the server, bounded).
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from mlflow.tracking import MlflowClient

from medmtl.errors import TrackingError
from medmtl.tracking.spool import LOGGED_MODEL, Spool, send_records
from medmtl.tracking.store import redact_uri, tracking_error

__all__ = ["RunLogger", "NullLogger", "last_logged_steps", "SPOOL_DIR_NAME", "terminate_run", "LOGGED_MODEL"]

log = logging.getLogger(__name__)

SPOOL_DIR_NAME = "mlflow_spool"  # beside the run's checkpoints: <out_dir>/<run_id>/mlflow_spool/


class NullLogger:
    """Logger that records nothing (ranks other than 0, tests)."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Ignore."""

    def flush(self) -> None:
        """Ignore."""

    def end(self, status: str = "FINISHED") -> None:
        """Ignore."""


class RunLogger:
    """One MLflow run: params, tags, metric points and artifacts, sent in the background, spooled on disk.

    Args:
        tracking_uri: MLflow tracking URI (server or SQLite).
        experiment_id: experiment of a new run.
        run_name: name of a new run.
        tags: tags of a new run (sent with the create request).
        flush_every: buffered points that make the sender wake up before ``flush_interval_s``.
        run_id: continue this run instead of creating one (resume); its leftover spool is sent first.
        spool_root: the run's spool goes to ``spool_root/<run_id>/mlflow_spool/`` (beside the checkpoints);
            default: the system's temporary folder.
        settings: a :class:`~medmtl.config.TrackingConfig` (intervals and timeouts); default: its defaults.

    Creating the run is the one synchronous request: without a run id there is nothing to log to, so
    an unreachable server at start is an error naming the URI (bounded by the HTTP settings), and a
    refused login (401) or grant (403) a one-line :class:`~medmtl.errors.TrackingError` saying what to set.
    """

    def __init__(self, *, tracking_uri: str, experiment_id: str, run_name: str, tags: dict[str, str] | None = None,
                 flush_every: int = 500, run_id: str | None = None, spool_root: str | Path | None = None,
                 settings=None) -> None:
        from medmtl.config import TrackingConfig

        s = settings if settings is not None else TrackingConfig()
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        try:
            if run_id is None:
                self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags or {}).info.run_id
            else:
                # resuming: the same run continues (status back to RUNNING)
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
        except Exception as err:
            # a server that answers 401/403 is up: the login or the grant is wrong, not the server
            refused = tracking_error(err, tracking_uri, doing=f"log runs to experiment {experiment_id}" if run_id is None
                                     else f"resume run {run_id}")
            if refused is not None:
                raise refused from err
            raise TrackingError(
                f"cannot start an MLflow run at {redact_uri(tracking_uri)}: {err}. Start the server (see mlflow/README.md), "
                "or unset MLFLOW_TRACKING_URI and tracking.tracking_uri to use the embedded store under mlflow/"
            ) from err
        root = Path(spool_root) if spool_root is not None else Path(tempfile.gettempdir()) / "medmtl-spool"
        try:
            self.spool = Spool(root / self.run_id / SPOOL_DIR_NAME, run_id=self.run_id, tracking_uri=tracking_uri)
        except BaseException:
            # the run exists on the server but cannot log anything: end it FAILED rather than RUNNING forever
            terminate_run(self.client, self.run_id, "FAILED")
            raise
        self.flush_every = flush_every
        self.flush_interval_s = s.flush_interval_s
        self.retry_interval_s = s.retry_interval_s
        self.final_sync_timeout_s = s.final_sync_timeout_s
        self.offline_since: float | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._urgent = threading.Event()
        self._points: list[list] = []  # [key, value, timestamp_ms, step] not yet in the spool
        self._ended = False
        self._sender = threading.Thread(target=self._run_sender, name=f"mlflow-sender-{self.run_id[:8]}", daemon=True)
        self._sender.start()

    # ------------------------------------------------------------------ what the caller logs (fast)
    def log_metrics(self, metrics: dict[str, float], step: int, *, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        """Buffer metric points in memory (microseconds; NaN and inf are kept, MLflow stores them).

        ``model_id`` links the points to a logged model (its page lists them); ``dataset`` is the
        ``(name, digest)`` of a run input (:meth:`log_inputs`) they were measured on.
        """
        ts = int(time.time() * 1000)
        link = {k: v for k, v in (("model_id", model_id), ("dataset", list(dataset) if dataset else None)) if v}
        rows = [[_clean(k), float(v), ts, int(step)] + ([link] if link else []) for k, v in metrics.items()]
        with self._lock:
            self._points.extend(rows)
            full = len(self._points) >= self.flush_every
        if full:
            self._wake.set()

    def log_params(self, params: dict[str, Any]) -> None:
        """Params (values cut to MLflow's 6000 characters)."""
        self._append({"op": "params", "items": [[k, str(v)[:6000]] for k, v in params.items()]})

    def log_inputs(self, datasets: list[dict]) -> None:
        """Run inputs: dicts with ``name``, ``digest``, ``source_type``, ``source``, ``profile`` and ``context``
        (``training``, ``validation``, ``test``), shown as the run's datasets."""
        self._append({"op": "inputs", "items": list(datasets)})

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags."""
        self._append({"op": "tags", "items": [[k, str(v)] for k, v in tags.items()]})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a local file (copied into the spool now, so the caller may delete it)."""
        kept = self.spool.keep_file(path)
        self._append({"op": "artifact", "src": str(kept), "dst": artifact_path})

    def log_model(self, stage: Callable[[Path], Any]) -> None:
        """Spool a model: ``stage(folder)`` writes its files into a spool folder now; the upload follows in order.

        So the end of a run (model, then final status) takes the same durable path as metrics: with the
        server down the model waits on disk and ``medmtl sync`` logs it later. :attr:`model_uri` is set once
        the server has it.
        """
        folder = self.spool.new_folder("model")
        stage(folder)
        self._append({"op": "model", "src": str(folder)})

    @property
    def model_uri(self) -> str | None:
        """URI of the model logged through :meth:`log_model`, once the server has it."""
        return self.spool.model_uri

    def log_dict(self, data: dict, artifact_file: str) -> None:
        """Write ``data`` as JSON and log it as an artifact at ``artifact_file``."""
        self.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` as an artifact file at ``artifact_file`` (e.g. ``config.yaml``, ``plots/a.txt``)."""
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / Path(artifact_file).name
            p.write_text(text)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(p, None if parent == "." else parent)

    # ------------------------------------------------------------------ durability and the end
    def flush(self) -> None:
        """Make everything logged so far safe on local disk (spool + fsync); no network wait."""
        self._persist(durable=True)
        self._wake.set()

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until the server has everything logged so far, at most ``timeout`` seconds
        (default ``final_sync_timeout_s``); True when nothing is left unsent."""
        self.flush()
        deadline = time.monotonic() + (self.final_sync_timeout_s if timeout is None else timeout)
        self._urgent.set()
        try:
            while self.spool.n_unsent and time.monotonic() < deadline and self._sender.is_alive():
                self._wake.set()
                time.sleep(0.05)
        finally:
            self._urgent.clear()
        return self.spool.n_unsent == 0

    def end(self, status: str = "FINISHED") -> None:
        """Close the run: record the final status, send everything (bounded), stop the sender.

        What the server has not taken by ``final_sync_timeout_s`` stays in the spool folder and a
        warning names the command that sends it later; training results are never discarded.
        """
        if self._ended:
            return
        self._ended = True
        self._append({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})
        done = self.sync()
        self._stop.set()
        self._wake.set()
        self._sender.join(timeout=max(5.0, self.flush_interval_s))
        if not done:
            log.warning("MLflow server %s unreachable: %d records of run %s are kept in %s; send them with "
                        "`python -m medmtl.tracking.spool %s` when the server is back",
                        self.tracking_uri, self.spool.n_unsent, self.run_id, self.spool.folder, self.spool.folder)
        self.spool.close()

    @property
    def unsent(self) -> int:
        """Records (not points) waiting for the server, including those still in memory."""
        with self._lock:
            buffered = 1 if self._points else 0
        return self.spool.n_unsent + buffered

    # ------------------------------------------------------------------ internals
    def _append(self, record: dict) -> None:
        # keep order: buffered points first, then this record
        self._persist(durable=False, extra=record)
        self._wake.set()

    def _persist(self, *, durable: bool, extra: dict | None = None) -> None:
        with self._lock:
            points, self._points = self._points, []
        records = [{"op": "metrics", "items": points}] if points else []
        if extra is not None:
            records.append(extra)
        self.spool.append(records, durable=durable)
        if durable and not records:
            self.spool.sync_to_disk()

    def _run_sender(self) -> None:
        """Background thread: move buffered points to the spool, send the spool, back off while offline."""
        sender = MlflowClient(tracking_uri=self.tracking_uri)
        next_try = 0.0
        while True:
            stopping = self._stop.is_set()
            self._wake.wait(timeout=0.2 if self._urgent.is_set() else self.flush_interval_s)
            self._wake.clear()
            self._persist(durable=False)
            now = time.monotonic()
            if self.spool.n_unsent and (now >= next_try or self._urgent.is_set()):
                try:
                    ok, _ = send_records(self.spool, sender)
                except Exception:  # noqa: BLE001 - the sender must outlive any surprise; records stay spooled
                    log.exception("MLflow sender of run %s failed; records stay in %s", self.run_id, self.spool.folder)
                    ok = False
                if ok:
                    if self.offline_since is not None:
                        log.warning("MLflow server %s reachable again after %.0f s; spooled records sent",
                                    self.tracking_uri, time.monotonic() - self.offline_since)
                    self.offline_since = None
                else:
                    if self.offline_since is None:
                        self.offline_since = now
                        log.warning("MLflow server %s not answering; training goes on, records are kept in %s "
                                    "and sent when it is back", self.tracking_uri, self.spool.folder)
                    next_try = time.monotonic() + (1.0 if self._urgent.is_set() else self.retry_interval_s)
            if stopping:
                return


def last_logged_steps(tracking_uri: str, run_id: str, spool_root: str | Path | None = None) -> dict[str, int]:
    """Per metric key, the highest step already stored for ``run_id`` (a resumed run skips up to there).

    Points still waiting in the run's spool (``spool_root/<run_id>/mlflow_spool``) count as logged: they
    are sent before anything new.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    out: dict[str, int] = {}
    for key in client.get_run(run_id).data.metrics:
        history = client.get_metric_history(run_id, key)
        if history:
            out[key] = max(m.step for m in history)
    folder = Path(spool_root) / run_id / SPOOL_DIR_NAME if spool_root is not None else None
    if folder is not None and (folder / "records.jsonl").exists():
        for line in (folder / "records.jsonl").read_text().splitlines():
            rec = json.loads(line) if line.endswith("}") else {}
            for item in rec.get("items", ()) if rec.get("op") == "metrics" else ():
                out[item[0]] = max(out.get(item[0], -1), int(item[3]))
    return out


def terminate_run(client: MlflowClient, run_id: str, status: str) -> None:
    """Set the run's final status directly on the server; a failure here is logged, never raised over the cause."""
    try:
        client.set_terminated(run_id, status=status)
    except Exception as err:  # noqa: BLE001 - called while another error propagates
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, str(err).splitlines()[0] if str(err) else err)


def _clean(key: str) -> str:
    # MLflow accepts alphanumerics, _ - . space : / only
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)

