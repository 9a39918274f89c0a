"""Outages of a real tracking server: training goes on, and every metric point ends up on the server.

One ``mlflow server`` process for the module (started through ``mlflow/serve.py`` on 127.0.0.1, one worker,
job runner off, a copy of a migrated SQLite database as backend), stopped, killed and restarted by the tests.
"""

from __future__ import annotations

import shutil
import signal
import threading

import pytest
from mlflow.tracking import MlflowClient

from tracking_helpers import TINY_CONFIG, MlflowServer, free_port

pytestmark = pytest.mark.slow

FAST_RETRY = {"http_timeout_s": 1, "http_max_retries": 0, "http_backoff_factor": 0, "flush_interval_s": 0.2,
              "retry_interval_s": 0.5, "final_sync_timeout_s": 90.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory, empty_db):
    store = tmp_path_factory.mktemp("server_store")
    shutil.copyfile(empty_db, store / "mlflow.db")
    srv = MlflowServer(store=store, port=free_port()).start()
    yield srv
    srv.kill()


@pytest.fixture
def bounded_http(monkeypatch):
    """Let the code under test set MLflow's HTTP variables; restore them afterwards."""
    for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.setenv(k, "0")
        monkeypatch.delenv(k)


def _assert_all_on_server(client: MlflowClient, run_id: str, points: list[tuple[str, int, float]]) -> None:
    stored: dict[str, set] = {}
    for key in {k for k, _, _ in points}:
        stored[key] = {(m.step, m.value) for m in client.get_metric_history(run_id, key)}
    missing = [(k, s, v) for k, s, v in points if (s, v) not in stored[k]]
    assert not missing, f"{len(missing)} of {len(points)} points missing on the server, e.g. {missing[:5]}"


def test_training_goes_on_while_the_server_is_killed_and_restarted(server, tiny_dataset, tmp_path, monkeypatch, bounded_http):
    import medmtl.tracking.run as tracked_run
    import pipelines.train as train_pipeline
    from medmtl.config import load_config
    from medmtl.tracking.logger import RunLogger

    data_dir, _ = tiny_dataset
    seen: list[tuple[str, int, float]] = []
    during_outage: list[int] = []
    state = {"down": False}
    restarted = threading.Event()

    def restart():
        server.start()
        state["down"] = False
        restarted.set()

    class OutageLogger(RunLogger):
        """Kills the server at training step 3 and restarts it (in the background) at step 6."""

        def log_metrics(self, metrics, step, **link):
            if "loss/ct" in metrics:
                if step == 3 and not state["down"]:
                    server.kill()
                    state["down"] = True
                if step == 6:
                    threading.Thread(target=restart, daemon=True).start()
                if state["down"]:
                    during_outage.append(step)
            seen.extend((k, int(step), float(v)) for k, v in metrics.items() if not k.startswith("system/"))
            super().log_metrics(metrics, step, **link)

    monkeypatch.setattr(tracked_run, "RunLogger", OutageLogger)
    overrides = [f"data.root={data_dir}", f"tracking.tracking_uri={server.uri}", "tracking.experiment=outage",
                 "train.steps=10", "train.val_every=5", "tracking.overlay_cases=1", "tracking.system_metrics_interval_s=0.5"]
    overrides += [f"tracking.{k}={v}" for k, v in FAST_RETRY.items()]
    res = train_pipeline.run_training(load_config(TINY_CONFIG, overrides), out_dir=tmp_path / "runs", progress=False)

    assert restarted.wait(60)
    assert during_outage, "no training step happened while the server was down"
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    _assert_all_on_server(client, res.run_id, seen)
    assert [m.step for m in client.get_metric_history(res.run_id, "loss/ct")] == list(range(1, 11))
    assert any(k.startswith("system/") for k in run.data.metrics)
    names = {a.path for a in client.list_artifacts(res.run_id, "plots")}
    assert "plots/losses.png" in names
    assert res.model_uri is not None
    assert not (tmp_path / "runs" / res.run_id / "mlflow_spool").exists(), "spool should be gone once everything was sent"


def test_records_wait_on_disk_when_the_server_hangs_then_dies_and_are_sent_later(server, tmp_path, bounded_http):
    from medmtl.config import TrackingConfig
    from medmtl.tracking.logger import RunLogger
    from medmtl.tracking.spool import main as send_spool
    from medmtl.tracking.store import apply_http_settings, ensure_experiment

    settings = TrackingConfig(**{**FAST_RETRY, "final_sync_timeout_s": 1.0})
    apply_http_settings(settings)
    exp = ensure_experiment("hang", server.uri, None)
    logger = RunLogger(tracking_uri=server.uri, experiment_id=exp, run_name="hang", spool_root=tmp_path, settings=settings)
    points = []

    def log_steps(steps):
        for s in steps:
            m = {"loss/a": 1.0 / s, "loss/b": float(s), "weight/a": 0.5}
            points.extend((k, s, v) for k, v in m.items())
            logger.log_metrics(m, step=s)

    logger.log_params({"lr": 0.1})
    log_steps(range(1, 21))
    assert logger.sync(timeout=30)
    server.signal(signal.SIGSTOP)  # accepts connections, answers nothing
    log_steps(range(21, 41))
    logger.flush()
    spool_dir = tmp_path / logger.run_id / "mlflow_spool"
    assert (spool_dir / "records.jsonl").stat().st_size > 0, "unsent points must be on local disk after flush"
    server.kill()
    log_steps(range(41, 61))
    logger.end("FINISHED")  # server still down: records stay in the spool
    assert spool_dir.exists() and logger.spool.n_unsent > 0

    server.start()
    assert send_spool([str(spool_dir)]) == 0
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.1"
    _assert_all_on_server(client, logger.run_id, points)
    assert len(client.get_metric_history(logger.run_id, "loss/a")) == 60  # each point once
    assert not spool_dir.exists()


def test_outage_over_the_end_of_a_run_is_completed_by_medmtl_sync(server, tiny_dataset, tmp_path, monkeypatch, bounded_http, capsys):
    """Issue 12, item 5: the server dies as the run ends (held-out scores, plots, model, final status).

    Old failure: the model upload was synchronous, so the run ended FAILED with no model although best.pt and
    last.pt existed, and the exit was a long traceback. Now the end goes through the spool and `medmtl sync`
    completes the run: model logged, status FINISHED.
    """
    import medmtl.tracking.run as tracked_run
    import pipelines.train as train_pipeline
    from medmtl import cli
    from medmtl.config import load_config
    from medmtl.tracking.logger import RunLogger

    data_dir, _ = tiny_dataset

    class EndOutageLogger(RunLogger):
        """Kills the server when the model is spooled, i.e. when the run starts to end."""

        def log_model(self, stage):
            if server.proc is not None and server.proc.poll() is None:
                self.sync(timeout=30)  # everything of training is on the server; only the end will be missing
                server.kill()
            super().log_model(stage)

    monkeypatch.setattr(tracked_run, "RunLogger", EndOutageLogger)
    overrides = [f"data.root={data_dir}", f"tracking.tracking_uri={server.uri}", "tracking.experiment=end-outage",
                 "train.steps=4", "train.val_every=4", "tracking.overlay_cases=1", "tracking.system_metrics=false",
                 "data.val_fraction=0.34", "data.test_fraction=0.34"]
    overrides += [f"tracking.{k}={v}" for k, v in {**FAST_RETRY, "final_sync_timeout_s": 2.0}.items()]
    try:
        res = train_pipeline.run_training(load_config(TINY_CONFIG, overrides), out_dir=tmp_path / "runs", progress=False)
    finally:
        server.start()
    assert res.model_uri is None and res.unsent_spool is not None
    ckpt = tmp_path / "runs" / res.run_id
    assert (ckpt / "last.pt").exists() and (ckpt / "best.pt").exists()
    client = MlflowClient(tracking_uri=server.uri)
    assert client.get_run(res.run_id).info.status == "RUNNING"  # the server never heard the end (yet)

    assert cli.main(["sync", res.unsent_spool]) == 0
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert any(k.startswith("test/dice/") for k in run.data.metrics)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{res.run_id}'")
    assert len(models) == 1 and models[0].status.name == "READY"
    # the final scores, spooled before the model had an id, are linked to it once it is uploaded: its page shows them
    assert {m.key for m in models[0].metrics or []} >= {k for k in run.data.metrics if k.startswith("test/dice/")}
    assert not (ckpt / "mlflow_spool").exists()
