"""A run's write-ahead log of tracking records on local disk, and the sender that drains it.

Every record a :class:`~medmtl.tracking.logger.RunLogger` produces (metric points, params, tags,
artifacts, the model, the final status) is appended to ``<spool_dir>/records.jsonl`` before it is sent, and a
separate offset file says how far the server has acknowledged. So:

* a flush is a local append (and ``fsync``), never a network wait: training does not stall when the
  tracking server hangs or is down;
* nothing is lost when the server is down for a while, when the process dies, or when the run ends
  before the server is back: the records stay on disk and are sent later, in order, by the logger's
  background thread or by ``python -m medmtl.tracking.spool SPOOL_DIR``;
* a record may be sent twice (a request that timed out after the server stored it); that is harmless,
  MLflow stores a metric point ``(key, value, timestamp, step)`` once, and params, tags and artifacts
  are idempotent.

The spool folder holds no patient data: only what MLflow receives anyway (pseudonymous metric keys,
config values, PHI-free artifacts).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from medmtl.atomic import atomic_write_bytes
from medmtl.errors import InputError, TrackingError
from medmtl.tracking.links import logged_model_id

__all__ = ["Spool", "SpoolRecord", "send_records", "is_transient", "replay_spool", "SPOOL_META", "LOGGED_MODEL"]

log = logging.getLogger(__name__)

SPOOL_META = "spool.json"
_RECORDS = "records.jsonl"
_OFFSET = "records.offset"
_FILES = "files"
_MODEL_URI = "model_uri.txt"  # the URI of the model this spool logged
#: a metric point's ``model_id`` that stands for the model this spool uploads (its id is known only then)
LOGGED_MODEL = "@spooled-model"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch request
MAX_PARAMS_PER_BATCH = 100


@dataclass
class SpoolRecord:
    """One record and the byte offset just past it in ``records.jsonl``."""

    end: int
    data: dict[str, Any]


class Spool:
    """Append-only JSONL log plus the offset up to which the server has acknowledged.

    Thread-safe: any thread may :meth:`append`; one sender thread takes :meth:`pending` records and
    :meth:`ack`s them after the server accepted them.
    """

    def __init__(self, folder: str | Path, *, run_id: str, tracking_uri: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / _FILES).mkdir(exist_ok=True)
        self.path = self.folder / _RECORDS
        self.run_id, self.tracking_uri = run_id, tracking_uri
        # set when a spooled model has been logged; kept on disk so that metric points linked to it
        # (LOGGED_MODEL) find its id in a later `medmtl sync` too
        self.model_uri: str | None = None
        if (self.folder / _MODEL_URI).is_file():
            self.model_uri = (self.folder / _MODEL_URI).read_text().strip() or None
        meta = self.folder / SPOOL_META
        if meta.exists():
            old = json.loads(meta.read_text())
            if old.get("run_id") != run_id:
                raise TrackingError(f"spool {self.folder} belongs to run {old.get('run_id')}, not {run_id}; "
                                 "send it first (python -m medmtl.tracking.spool FOLDER) or choose another folder")
        else:
            atomic_write_bytes(meta, json.dumps({"run_id": run_id, "tracking_uri": _without_credentials(tracking_uri)}).encode())
        self._lock = threading.Lock()
        self._unsent: deque[SpoolRecord] = deque()
        self._fh = open(self.path, "ab")
        self._acked = self._read_offset()
        self._load_unsent()

    # -- writing (any thread)
    def append(self, records: list[dict[str, Any]], *, durable: bool = False) -> None:
        """Append records (JSON-serializable dicts); ``durable`` also fsyncs the file."""
        if not records:
            return
        with self._lock:
            for rec in records:
                self._fh.write((json.dumps(rec, separators=(",", ":")) + "\n").encode())
                self._fh.flush()
                self._unsent.append(SpoolRecord(self._fh.tell(), rec))
            if durable:
                os.fsync(self._fh.fileno())

    def sync_to_disk(self) -> None:
        """fsync what was appended so far."""
        with self._lock:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def keep_file(self, src: str | Path) -> Path:
        """Copy ``src`` into the spool (an artifact must outlive the caller's temporary file)."""
        # one folder per record keeps the artifact's own file name for the upload; a random name cannot
        # collide with files left by an earlier process of the same run
        dst = self.folder / _FILES / uuid.uuid4().hex / Path(src).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return dst

    def new_folder(self, name: str) -> Path:
        """A fresh folder inside the spool for a record's files (e.g. a staged model); removed once acknowledged."""
        dst = self.folder / _FILES / uuid.uuid4().hex / name
        dst.mkdir(parents=True)
        return dst

    # -- draining (one sender thread)
    def pending(self) -> list[SpoolRecord]:
        """Records not yet acknowledged, oldest first."""
        with self._lock:
            return list(self._unsent)

    def ack(self, upto: SpoolRecord) -> None:
        """Mark every record up to and including ``upto`` as stored by the server."""
        with self._lock:
            while self._unsent and self._unsent[0].end <= upto.end:
                rec = self._unsent.popleft()
                if rec.data.get("op") in ("artifact", "model"):
                    shutil.rmtree(Path(rec.data["src"]).parent, ignore_errors=True)
            self._acked = upto.end
            if not self._unsent:
                # everything acknowledged: start the log afresh so it never grows without bound
                self._fh.truncate(0)
                self._fh.seek(0)
                self._acked = 0
            atomic_write_bytes(self.folder / _OFFSET, str(self._acked).encode())

    @property
    def n_unsent(self) -> int:
        """How many records wait for the server."""
        with self._lock:
            return len(self._unsent)

    def close(self) -> None:
        """Close the file; remove the folder when nothing is left to send."""
        with self._lock:
            self._fh.close()
            empty = not self._unsent
        if empty:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- internals
    def _read_offset(self) -> int:
        p = self.folder / _OFFSET
        return int(p.read_text() or 0) if p.exists() else 0

    def _load_unsent(self) -> None:
        """Records left by an earlier process (crash, or the server down until the end)."""
        with open(self.path, "rb") as f:
            f.seek(self._acked)
            pos = self._acked
            for line in f:
                pos += len(line)
                if not line.endswith(b"\n"):
                    break  # a line cut short by a crash: it was never flushed, so never acknowledged
                self._unsent.append(SpoolRecord(pos, json.loads(line)))
        with open(self.path, "r+b") as f:
            f.truncate(self._unsent[-1].end if self._unsent else self._acked)


# ----------------------------------------------------------------------------------------- sending
def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying later (server down, hung, overloaded); False for rejections.

    MLflow raises connection errors and timeouts as ``MlflowException`` with ``INTERNAL_ERROR`` (HTTP
    500); a 4xx answer (bad value, unknown run) will not change by sending it again. A refused login
    or grant (401, 403) is about the sender, not the record: it is kept for a sender with credentials.
    """
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status >= 500 or status in (401, 403, 408, 429)
    return not isinstance(err, (TypeError, ValueError, KeyError))


def _batches(records: list[SpoolRecord]) -> list[tuple[str, list[SpoolRecord]]]:
    """Group consecutive records of one kind into requests within MLflow's batch limits."""
    out: list[tuple[str, list[SpoolRecord]]] = []
    size = 0
    for rec in records:
        op = rec.data["op"]
        n = len(rec.data.get("items", ()))
        limit = MAX_METRICS_PER_BATCH if op == "metrics" else MAX_PARAMS_PER_BATCH if op == "params" else 0
        if out and out[-1][0] == op and limit and size + n <= limit:
            out[-1][1].append(rec)
            size += n
        else:
            out.append((op, [rec]))
            size = n
    return out


def _metric(key: str, value: float, ts: int, step: int, link: dict | None = None, logged_model: str | None = None) -> Metric:
    """A metric point; ``link`` may tie it to a logged model (``model_id``) and a run input (``dataset``).

    ``model_id`` :data:`LOGGED_MODEL` means the model this spool uploaded (``logged_model``, its id); the link
    is dropped when there is none.
    """
    link = link or {}
    name, digest = link.get("dataset") or (None, None)
    model_id = link.get("model_id")
    if model_id == LOGGED_MODEL:
        model_id = logged_model
    return Metric(key, float(value), int(ts), int(step), model_id=model_id, dataset_name=name, dataset_digest=digest)


def _dataset_input(d: dict):
    """An MLflow ``DatasetInput`` from a spooled input record (see ``RunLogger.log_inputs``)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                 schema=d.get("schema"), profile=d.get("profile"))
    return DatasetInput(dataset=ds, tags=[InputTag(key="mlflow.data.context", value=d["context"])])


def _send(client, spool: Spool, op: str, recs: list[SpoolRecord]) -> int:
    """One request for ``recs`` (a model: its upload); returns the number of metric points sent."""
    run_id = spool.run_id
    items = [it for r in recs for it in r.data.get("items", ())]
    if op == "metrics":
        logged = logged_model_id(spool.model_uri)
        client.log_batch(run_id, metrics=[_metric(*it, logged_model=logged) for it in items])
        return len(items)
    if op == "inputs":
        datasets = [_dataset_input(d) for d in items]
        try:
            client.log_inputs(run_id, datasets=datasets)
        except MlflowException as err:
            # a SQLite store and two runs logging the same dataset at once (a study's workers): both look for
            # its row, both insert, the second insert fails although the row now exists; sent again, the
            # store finds that row and only links it to this run
            if "UNIQUE constraint failed: datasets" not in str(err):
                raise
            client.log_inputs(run_id, datasets=datasets)
        return 0
    if op == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in items])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in items])
    elif op == "artifact":
        d = recs[0].data
        client.log_artifact(run_id, d["src"], artifact_path=d.get("dst"))
    elif op == "model":
        from medmtl.inference.pyfunc_model import log_staged_model

        spool.model_uri = log_staged_model(Path(recs[0].data["src"]), run_id=run_id, tracking_uri=spool.tracking_uri)
        atomic_write_bytes(spool.folder / _MODEL_URI, spool.model_uri.encode())
    elif op == "terminate":
        d = recs[0].data
        client.set_terminated(run_id, status=d["status"], end_time=d["end_time"])
    else:
        raise ValueError(f"unknown spool record op {op!r}")
    return 0


def send_records(spool: Spool, client, *, stop: Callable[[], bool] = lambda: False) -> tuple[bool, int]:
    """Send every pending record in order; ``(all_sent, metric_points_sent)``.

    Stops at the first transient error (the rest stays spooled for the next attempt). A record the
    server rejects is dropped with a warning naming it, since sending it again cannot succeed; in a
    batch, only the rejected records are dropped.
    """
    sent = 0
    for op, recs in _batches(spool.pending()):
        if stop():
            return False, sent
        try:
            sent += _send(client, spool, op, recs)
        except Exception as err:  # noqa: BLE001 - classified below
            if is_transient(err):
                return False, sent
            for rec in recs if len(recs) > 1 else []:
                try:
                    sent += _send(client, spool, op, [rec])
                except Exception as one:  # noqa: BLE001
                    if is_transient(one):
                        return False, sent
                    log.warning("tracking server rejected a %s record of run %s; dropped: %s", op, spool.run_id, one)
            if len(recs) == 1:
                log.warning("tracking server rejected a %s record of run %s; dropped: %s", op, spool.run_id, err)
        spool.ack(recs[-1])
    return True, sent


def replay_spool(folder: str | Path, tracking_uri: str | None = None) -> int:
    """Send what a finished or crashed run left in ``folder``; returns the records still unsent."""
    from mlflow.tracking import MlflowClient

    from medmtl.tracking.store import refuse_credentials, tracking_errors

    if tracking_uri:
        refuse_credentials(tracking_uri, "--tracking-uri")
    folder = Path(folder)
    meta_path = folder / SPOOL_META
    if not meta_path.exists():
        raise InputError(f"{folder} is not a tracking spool (no {SPOOL_META}); pass the folder named in the run's warning")
    meta = json.loads(meta_path.read_text())
    uri = tracking_uri or meta["tracking_uri"]
    spool = Spool(folder, run_id=meta["run_id"], tracking_uri=uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        if spool.n_unsent:
            # a refused login keeps every record; say so in one line rather than "N records left"
            with tracking_errors(uri, doing=f"send the spool of run {meta['run_id']}"):
                client.get_run(meta["run_id"])
        send_records(spool, client)
        return spool.n_unsent
    finally:
        spool.close()


def _without_credentials(uri: str) -> str:
    """The URI without ``user:password@`` (credentials belong in MLFLOW_TRACKING_USERNAME/PASSWORD, not on disk)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def main(argv: list[str] | None = None) -> int:
    """``python -m medmtl.tracking.spool SPOOL_DIR [--tracking-uri URI]``: send a run's leftover records."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m medmtl.tracking.spool", description=main.__doc__)
    ap.add_argument("spool_dir")
    ap.add_argument("--tracking-uri", default=None, help="default: the URI the run used")
    args = ap.parse_args(argv)
    try:
        left = replay_spool(args.spool_dir, args.tracking_uri)
    except TrackingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if left:
        print(f"{left} records still unsent (server unreachable?); run this again later", file=sys.stderr)
        return 1
    print("all records sent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
