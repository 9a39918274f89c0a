"""Tracking overhead per training step, and time from `medmtl predict` start to written output (JSON lines).

Run: ``python benchmarks/tracking.py`` (a few minutes on 2 cores; ``--steps`` and ``--rounds`` scale it).

A small synthetic dataset is written and ingested in a temporary folder. Then:

* ``tracking_step``: the tiny test model (``tests/configs/tiny.yaml``, the cheapest step, so the worst case
  for relative overhead) trained ``--steps`` steps with every step's metrics logged (``log_every=1``), for
  each way of tracking, in interleaved rounds (a busy moment of a shared machine hits every variant alike):

  - ``none``: no tracking (``NullLogger``);
  - ``sqlite``: medmtl's ``RunLogger`` (background sender, spool) into the embedded SQLite store;
  - ``server``: ``RunLogger`` into a local ``mlflow server`` (``mlflow/serve.py``, one worker);
  - ``server_sync``: for reference, one synchronous ``log_batch`` request per step to the same server
    (what DESIGN.md rules out).

  Per variant: ``step_ms`` = median wall time between two consecutive steps (the loop as the trainer runs
  it, logging included, validation excluded; median over rounds, each round's value in
  ``step_ms_per_round``), ``logger_ms_per_step`` = time the training thread spent inside logger calls per
  step, and ``ratio`` = median over rounds of ``step_ms`` / ``step_ms`` of ``none`` in the same round
  (1.00 = no overhead).
* ``predict``: the demo configuration's model (``configs/demo.yaml`` architecture, untrained weights:
  inference time does not depend on their values) logged as a pyfunc model, then ``medmtl predict`` run as
  a new process on a demo-size CT volume, as a NIfTI file and as a DICOM series folder (NIfTI + DICOM
  SEG out). ``seconds`` = wall time from process start to exit with the output written (imports and model
  loading included); ``in_process_seconds`` = what the command itself reports (model load + predict +
  write).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def emit(record: dict) -> None:
    """Print one JSON line."""
    print(json.dumps(record), flush=True)


class TimedLogger:
    """Wraps a logger: marks the start of every training step's log call and sums time inside logger calls."""

    def __init__(self, inner) -> None:
        self.inner, self.inside, self.marks = inner, 0.0, []

    def log_metrics(self, metrics, step):
        t = time.perf_counter()
        if "loss/ct" in metrics:
            self.marks.append(t)
        self.inner.log_metrics(metrics, step)
        self.inside += time.perf_counter() - t

    def flush(self):
        t = time.perf_counter()
        self.inner.flush()
        self.inside += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self.inner, name)


class SyncLogger:
    """The pattern DESIGN.md forbids, for reference: one blocking log_batch request per step."""

    def __init__(self, uri: str, experiment_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self.client.create_run(experiment_id).info.run_id

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def flush(self):
        pass

    def end(self, status="FINISHED"):
        self.client.set_terminated(self.run_id, status)


def _dataset(work: Path, *, ct_matrix: int, mr_matrix: int, n: int) -> Path:
    from medmtl.ingest.run import ingest
    from medmtl.synth import synthesize_exports

    synth = synthesize_exports(work / "synth", n_ct=n, n_mr=n, seed=3, ct_matrix=ct_matrix, mr_matrix=mr_matrix)
    ingest(synth.export_dir, work / "data", labels_dir=synth.labels_dir, progress=False)
    return work / "data"


def _server(store: Path, port: int) -> subprocess.Popen:
    import requests

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "mlflow" / "serve.py"), "--store", str(store), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    for _ in range(600):
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            time.sleep(0.2)
    raise TimeoutError("mlflow server did not start")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_step_overhead(work: Path, steps: int, rounds: int) -> None:
    """Emit one ``tracking_step`` line per variant."""
    import signal

    from medmtl.config import load_config
    from medmtl.data.loaders import load_split
    from medmtl.data.plan import load_plan
    from medmtl.tracking.logger import NullLogger, RunLogger
    from medmtl.tracking.store import apply_http_settings, ensure_experiment
    from medmtl.training.trainer import Trainer
    from medmtl.data.plan import ensure_plan

    data_dir = _dataset(work / "tiny", ct_matrix=64, mr_matrix=56, n=3)
    cfg = load_config(ROOT / "tests" / "configs" / "tiny.yaml",
                      [f"data.root={data_dir}", f"train.steps={steps}", f"train.val_every={steps}", "train.log_every=1"])
    apply_http_settings(cfg.tracking)
    plan = load_plan(ensure_plan(data_dir))
    _, split = load_split(cfg)
    sqlite_uri = f"sqlite:///{work / 'store' / 'mlflow.db'}"
    (work / "store").mkdir()
    sqlite_exp = ensure_experiment("bench", sqlite_uri, (work / "store" / "artifacts").as_uri())
    port = _free_port()
    (work / "server").mkdir()
    server = _server(work / "server", port)
    server_uri = f"http://127.0.0.1:{port}"
    server_exp = ensure_experiment("bench", server_uri, None)

    def make(variant: str):
        if variant == "none":
            return NullLogger()
        if variant == "sqlite":
            return RunLogger(tracking_uri=sqlite_uri, experiment_id=sqlite_exp, run_name="bench", spool_root=work / "spool", settings=cfg.tracking)
        if variant == "server":
            return RunLogger(tracking_uri=server_uri, experiment_id=server_exp, run_name="bench", spool_root=work / "spool", settings=cfg.tracking)
        return SyncLogger(server_uri, server_exp)

    variants = ["none", "sqlite", "server", "server_sync"]
    results: dict[str, dict[str, list[float]]] = {v: {"step": [], "inside": []} for v in variants}
    try:
        for r in range(rounds):
            for v in variants[r % len(variants):] + variants[: r % len(variants)]:
                logger = TimedLogger(make(v))
                trainer = Trainer(cfg=cfg, plan=plan, split=split, data_dir=data_dir, logger=logger,
                                  out_dir=work / "ckpt" / f"{v}-{r}", progress=False)
                trainer.train()
                gaps = [b - a for a, b in zip(logger.marks[2:], logger.marks[3:])]  # skip warm-up steps
                results[v]["step"].append(statistics.median(gaps))
                results[v]["inside"].append(logger.inside / steps)
                if hasattr(logger.inner, "end"):
                    logger.inner.end("FINISHED")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    for v in variants:
        # paired per round (variants of one round ran back to back), so a busy moment of the machine cancels out
        ratios = [a / b for a, b in zip(results[v]["step"], results["none"]["step"])]
        emit({"bench": "tracking_step", "variant": v, "steps": steps, "rounds": rounds,
              "step_ms": round(statistics.median(results[v]["step"]) * 1000, 2),
              "step_ms_per_round": [round(x * 1000, 1) for x in results[v]["step"]],
              "logger_ms_per_step": round(statistics.median(results[v]["inside"]) * 1000, 3),
              "ratio": round(statistics.median(ratios), 3)})


def bench_predict(work: Path) -> None:
    """Emit ``predict`` lines: process start to written output, NIfTI and DICOM input."""
    import pandas as pd

    from medmtl.config import config_to_yaml, load_config
    from medmtl.data.plan import compute_plan
    from medmtl.synth import synthesize_exports
    import torch

    from medmtl.training.parts import build_training_parts
    from medmtl.inference.pyfunc_model import log_segmentation_model
    from medmtl.tracking.store import ensure_experiment

    data_dir = _dataset(work / "demo", ct_matrix=96, mr_matrix=80, n=2)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={data_dir}"])
    plan = compute_plan(data_dir)
    store = work / "predict_store"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    store.mkdir()
    exp = ensure_experiment("bench-predict", uri, (store / "artifacts").as_uri())
    from mlflow.tracking import MlflowClient

    run_id = MlflowClient(tracking_uri=uri).create_run(exp).info.run_id
    names = list(dict.fromkeys(list(cfg.data.labels["ct"].values()) + list(cfg.data.labels["mr"].values())))
    model_uri = log_segmentation_model(run_id=run_id, tracking_uri=uri, net=build_training_parts(cfg, torch.device("cpu")).net, cfg_yaml=config_to_yaml(cfg),
                                       plan=plan.to_dict(), class_names=names)
    manifest = pd.read_json(data_dir / "manifest.jsonl", lines=True)
    ct = manifest[manifest.modality == "CT"].iloc[0]
    dicom = synthesize_exports(work / "demo_dicom", n_ct=1, n_mr=0, seed=9)  # ct_matrix 96, as the demo
    series = next(s for s in dicom.series if not s.is_localizer and s.modality == "CT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = uri
    for kind, src, extra in (("nifti", data_dir / ct.image, ["--modality", "CT"]), ("dicom", series.dicom_dir, [])):
        out = work / f"pred-{kind}" / "labels.nii.gz"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "medmtl.cli", "predict", model_uri, str(src), "--out", str(out), *extra],
                              env=env, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"medmtl predict failed: {proc.stderr[-2000:]}")
        reported = next((float(line.rsplit(" in ", 1)[1].split()[0]) for line in proc.stdout.splitlines() if line.startswith("wrote ")), None)
        shape = series.shape if kind == "dicom" else ct["shape"]
        emit({"bench": "predict", "input": kind, "shape": [int(v) for v in shape],
              "model": "configs/demo.yaml architecture", "seconds": round(seconds, 2), "in_process_seconds": reported,
              "seg_written": out.with_name("labels.seg.dcm").exists()})


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run both benchmarks in a temporary folder."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--skip-predict", action="store_true")
    args = ap.parse_args(argv)
    import torch

    emit({"bench": "tracking_setup", "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "load_avg_1min": round(os.getloadavg()[0], 2)})
    work = Path(tempfile.mkdtemp(prefix="medmtl-bench-tracking-"))
    try:
        bench_step_overhead(work, args.steps, args.rounds)
        if not args.skip_predict:
            bench_predict(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
