"""The embedded store is created once and safely; the spool survives crashes; the launcher's settings."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from medmtl.config import TrackingConfig
from medmtl.errors import TrackingError
from medmtl.tracking.spool import Spool, send_records
from medmtl.tracking.store import apply_http_settings, prepare_store, resolve_tracking_uri
from tracking_helpers import ROOT, clean_env


def test_two_processes_preparing_a_fresh_store_at_once_both_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    code = "import sys; from medmtl.tracking.store import prepare_store; prepare_store(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], env=clean_env(), stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert MlflowClient(tracking_uri=uri).search_experiments()  # migrated, with the Default experiment


def test_sqlite_uri_keeps_artifacts_beside_the_database(tmp_path):
    uri, artifacts = resolve_tracking_uri(f"sqlite:///{tmp_path}/x/mlflow.db")
    assert artifacts == (tmp_path / "x" / "artifacts").as_uri()
    assert resolve_tracking_uri("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None)


def test_http_settings_come_from_the_config(monkeypatch):
    for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.setenv(k, "999")
    apply_http_settings(TrackingConfig(http_timeout_s=7, http_max_retries=1, http_backoff_factor=3))
    import os

    assert (os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"], os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"],
            os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) == ("7", "1", "3")


def test_launcher_runs_one_worker_on_loopback_without_the_job_runner(tmp_path, capsys):
    serve = runpy.run_path(str(ROOT / "mlflow" / "serve.py"), run_name="serve")
    assert serve["main"](["--store", str(tmp_path), "--port", "5123", "--print"]) == 0
    cmd = capsys.readouterr().out
    assert cmd.startswith("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false ")
    assert "--host 127.0.0.1" in cmd and "--workers 1" in cmd and "--port 5123" in cmd
    assert f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}" in cmd


def test_spool_resends_after_a_crash_and_drops_only_rejected_records(tmp_path, empty_db):
    db = tmp_path / "mlflow.db"
    shutil.copyfile(empty_db, db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run("0").info.run_id
    client.log_param(run_id, "lr", "0.1")

    spool = Spool(tmp_path / "spool", run_id=run_id, tracking_uri=uri)
    spool.append([{"op": "metrics", "items": [["loss", 1.0 / s, 1000 + s, s] for s in range(1, 6)]},
                  {"op": "params", "items": [["lr", "0.2"]]},  # changing a param: the server rejects it
                  {"op": "metrics", "items": [["loss", 1.0 / s, 1000 + s, s] for s in range(6, 11)]}], durable=True)
    with open(tmp_path / "spool" / "records.jsonl", "ab") as f:
        f.write(b'{"op":"metrics","items":[["loss",0.0')  # a line cut short by a crash
    del spool  # the process "dies" without sending anything

    again = Spool(tmp_path / "spool", run_id=run_id, tracking_uri=uri)
    assert again.n_unsent == 3
    ok, points = send_records(again, client)
    assert ok and points == 10 and again.n_unsent == 0
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 11))
    assert client.get_run(run_id).data.params["lr"] == "0.1"
    again.close()
    assert not (tmp_path / "spool").exists()


def test_spool_refuses_another_runs_folder(tmp_path):
    Spool(tmp_path / "s", run_id="a" * 32, tracking_uri="sqlite:///x.db")
    with pytest.raises(TrackingError, match="belongs to run"):
        Spool(tmp_path / "s", run_id="b" * 32, tracking_uri="sqlite:///x.db")
    assert json.loads((tmp_path / "s" / "spool.json").read_text())["run_id"] == "a" * 32


def test_resumed_run_counts_spooled_points_as_logged(tmp_path, empty_db):
    from medmtl.tracking.logger import SPOOL_DIR_NAME, last_logged_steps

    db = tmp_path / "mlflow.db"
    shutil.copyfile(empty_db, db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run("0").info.run_id
    client.log_metric(run_id, "loss", 1.0, step=3)
    spool = Spool(tmp_path / run_id / SPOOL_DIR_NAME, run_id=run_id, tracking_uri=uri)
    spool.append([{"op": "metrics", "items": [["loss", 0.5, 1, 7], ["lr", 0.1, 1, 7]]}], durable=True)
    assert last_logged_steps(uri, run_id, spool_root=tmp_path) == {"loss": 7, "lr": 7}


def test_prepare_store_ignores_servers():
    prepare_store("http://127.0.0.1:1")  # nothing to create client-side; must not try to connect


def test_dataset_input_raced_by_another_run_is_linked_not_dropped(tmp_path, empty_db):
    """Two runs logging the same dataset at once on a SQLite store (a study's workers): the second insert of the
    dataset row fails with UNIQUE although the row exists by then. The record is sent again and linked, not dropped.

    The race itself is inside MLflow's store; here the other worker logs the dataset first and the first
    request answers what the store answered in a two-worker study on this machine.
    """
    from mlflow.exceptions import MlflowException

    db = tmp_path / "mlflow.db"
    shutil.copyfile(empty_db, db)
    uri = f"sqlite:///{db}"
    real = MlflowClient(tracking_uri=uri)
    mine, other = real.create_run("0").info.run_id, real.create_run("0").info.run_id
    record = {"name": "data-training", "digest": "19efdfa9be531e77", "source_type": "local", "source": '{"uri": "/data"}',
              "profile": '{"split": "training"}', "context": "training"}

    class RacedClient:
        """The real client; its first log_inputs loses the race to the other run."""

        def __init__(self):
            self.calls = 0

        def __getattr__(self, name):
            return getattr(real, name)

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            if self.calls == 1:
                real.log_inputs(other, datasets=datasets)  # the other worker's insert wins
                raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                      "datasets.name, datasets.digest")
            return real.log_inputs(run_id, datasets=datasets)

    spool = Spool(tmp_path / "spool", run_id=mine, tracking_uri=uri)
    spool.append([{"op": "inputs", "items": [record]}], durable=True)
    client = RacedClient()
    ok, _ = send_records(spool, client)
    assert ok and client.calls == 2
    for run_id in (mine, other):  # one dataset row, linked to both runs
        inputs = real.get_run(run_id).inputs.dataset_inputs
        assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("data-training", "19efdfa9be531e77")]
    spool.close()
