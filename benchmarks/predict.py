"""Prediction speed: cold `medmtl predict` with its breakdown, several volumes per call, the served model warm.

Run: ``python benchmarks/predict.py`` (``--quick``: one round, no server; what ``make bench`` runs).

Set-up (not timed): one synthetic CT and one MR patient at the demo's matrix (CT 96x96, MR 80x80), ingested;
the demo configuration's network (``configs/demo.yaml`` architecture, seeded untrained weights: inference
time does not depend on their values) logged as the pyfunc model and registered (alias challenger) in a
temporary SQLite store. Then, in ``--rounds`` interleaved rounds (a busy moment of the shared machine hits
every variant alike), JSON lines:

* ``predict_imports``: a new interpreter importing what the predict path needs (torch, mlflow, pandas,
  nibabel, MONAI transforms and inferers), with MONAI imported as usual (``full``) and through
  :func:`medmtl.inference.lean_imports.import_monai_for_inference` (``lean``); ``ratio`` = lean / full of
  wall time, ``cpu_ratio`` of CPU seconds (user + system of the child: less sensitive to other processes),
  medians over rounds.
* ``predict_cold``: ``medmtl predict`` of the CT volume as a new process; ``seconds`` = wall time from process
  start to exit with the NIfTI written, ``cpu_s`` its CPU seconds; the breakdown the command reports (``--timings``): ``interpreter``
  (process start until the command began: Python, argument parsing, the CLI's own imports), ``imports``,
  ``model_load`` (URI resolution, download, manifest verification, ``mlflow.pyfunc.load_model``), then per
  volume ``read``, ``preprocess``, ``sliding_window``, ``invert``, ``write``; ``goal_s`` 5.
* ``predict_batch``: one ``medmtl predict`` call on a folder of ``--batch`` copies of the CT volume;
  ``per_further_volume_s`` = median per-volume time (read to written) after the first; ``goal_s`` 1.
* ``predict_equal``: the labels written by the cold command equal those of an in-process prediction with
  MONAI imported in full (the lean import changes nothing).
* ``served``: ``mlflow models serve`` on the registered model (one worker); warm invocations (after one
  warm-up) with the CT volume as an ``image`` path, and as an ``array`` of JSON lists with its affine;
  ``seconds`` = median over ``--invocations``; ``goal_s`` 1.

Absolute times on a shared 2-core machine are not stable: read the ratios and the medians of one run
together, and the ``load_avg_1min`` printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_NAME = "bench-predict"
IMPORTS = "import torch, mlflow, pandas, nibabel"
FULL = f"{IMPORTS}; import monai.transforms, monai.inferers"
LEAN = f"{IMPORTS}; from medmtl.inference.lean_imports import import_monai_for_inference as f; f()"


def emit(record: dict) -> None:
    """Print one JSON line."""
    print(json.dumps(record), flush=True)


def _env(uri: str) -> dict[str, str]:
    from medmtl.procenv import interpreter_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", PYTHONPATH=str(ROOT))
    return interpreter_env(env)


def setup(work: Path) -> dict:
    """Synthetic CT + MR, ingested; the demo architecture logged and registered. Returns paths and the URI."""
    import torch
    from mlflow.tracking import MlflowClient

    from medmtl.config import config_to_yaml, load_config
    from medmtl.data.manifest import read_manifest
    from medmtl.data.plan import compute_plan, resolve_plan
    from medmtl.inference.pyfunc_model import log_segmentation_model
    from medmtl.ingest.run import ingest
    from medmtl.models.two_column import TwoColumnNet
    from medmtl.synth import synthesize_exports
    from medmtl.tracking.registry import register_run_model
    from medmtl.tracking.store import ensure_experiment

    synth = synthesize_exports(work / "synth", n_ct=1, n_mr=1, seed=0)
    data_dir = work / "data"
    ingest(synth.export_dir, data_dir, labels_dir=synth.labels_dir, progress=False)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={data_dir}"])
    plan = resolve_plan(compute_plan(data_dir, cfg), cfg)
    uri = f"sqlite:///{work / 'store' / 'mlflow.db'}"
    (work / "store").mkdir()
    exp = ensure_experiment("bench-predict", uri, (work / "store" / "artifacts").as_uri())
    run_id = MlflowClient(tracking_uri=uri).create_run(exp).info.run_id
    torch.manual_seed(0)
    names = list(dict.fromkeys([*cfg.data.labels["ct"].values(), *cfg.data.labels["mr"].values()]))
    logged = log_segmentation_model(run_id=run_id, tracking_uri=uri, net=TwoColumnNet(cfg=cfg), cfg_yaml=config_to_yaml(cfg),
                                    plan=plan.to_dict(), class_names=names)
    register_run_model(tracking_uri=uri, run_id=run_id, name=MODEL_NAME, model_uri=logged)
    entries = {e.modality: e for e in read_manifest(data_dir)}
    return {"uri": uri, "model": f"models:/{MODEL_NAME}@challenger", "ct": data_dir / entries["CT"].image,
            "mr": data_dir / entries["MR"].image, "ct_shape": list(entries["CT"].shape), "mr_shape": list(entries["MR"].shape)}


CPU: list[float] = []  # CPU seconds (user + system) of the last child process run by _timed


def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    """Wall seconds and stdout of ``cmd``; its CPU seconds go to ``CPU[-1]`` (less sensitive to a busy machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return seconds, proc.stdout


def _predict(s: dict, inputs: list[Path], out: Path, env: dict, modality: str = "CT") -> tuple[float, dict, list[dict]]:
    cmd = [sys.executable, "-m", "medmtl.cli", "predict", s["model"], *map(str, inputs), "--out", str(out), "--timings",
           "--modality", modality]
    seconds, stdout = _timed(cmd, env)
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"timings"')]
    return seconds, next(x for x in lines if x["timings"] == "startup"), [x for x in lines if x["timings"] == "volume"]


def bench_cold_and_batch(s: dict, work: Path, rounds: int, batch: int) -> None:
    """``predict_imports``, ``predict_cold``, ``predict_batch`` and ``predict_equal`` lines (see the module docstring)."""
    env = _env(s["uri"])
    imports = {"full": [], "lean": []}
    imports_cpu = {"full": [], "lean": []}
    cold: list[dict] = []
    further: list[float] = []
    batch_wall: list[float] = []
    for r in range(rounds):
        for variant, code in (("full", FULL), ("lean", LEAN)) if r % 2 == 0 else (("lean", LEAN), ("full", FULL)):
            imports[variant].append(_timed([sys.executable, "-c", code], env)[0])
            imports_cpu[variant].append(CPU[-1])
        out = work / f"cold-{r}.nii.gz"
        wall, startup, volumes = _predict(s, [s["ct"]], out, env)
        v = volumes[0]
        cold.append({"seconds": wall, "cpu_s": CPU[-1], "interpreter": wall - startup["total"], "imports": startup["imports"],
                     "model_load": startup["model_load"], **{k: v[k] for k in ("read", "preprocess", "sliding_window", "invert", "write")}})
        # a folder of copies of the CT volume, given as one input (copies: the same file twice is one output name)
        folder = work / f"batch-in-{r}"
        folder.mkdir()
        for i in range(batch):
            shutil.copyfile(s["ct"], folder / f"vol{i}.nii.gz")
        wall_b, _, vols = _predict(s, [folder], work / f"batch-out-{r}", env, modality="CT")
        batch_wall.append(wall_b)
        further += [x["total"] for x in vols[1:]]
    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    emit({"bench": "predict_imports", "full_s": med(imports["full"]), "lean_s": med(imports["lean"]),
          "ratio": round(statistics.median(lean / full for lean, full in zip(imports["lean"], imports["full"])), 3),
          "full_cpu_s": med(imports_cpu["full"]), "lean_cpu_s": med(imports_cpu["lean"]),
          "cpu_ratio": round(statistics.median(lean / full for lean, full in zip(imports_cpu["lean"], imports_cpu["full"])), 3),
          "rounds": rounds})
    emit({"bench": "predict_cold", "input": "nifti", "shape": s["ct_shape"], "model": "configs/demo.yaml architecture",
          **{k: med([c[k] for c in cold]) for k in cold[0]}, "seconds_per_round": [round(c["seconds"], 2) for c in cold],
          "goal_s": 5.0})
    emit({"bench": "predict_batch", "volumes": batch, "shape": s["ct_shape"], "input": "a folder of NIfTI files", "wall_s": med(batch_wall),
          "per_further_volume_s": med(further), "goal_s": 1.0})
    _check_equal(s, work / "cold-0.nii.gz")


def _check_equal(s: dict, written: Path) -> None:
    import nibabel as nib
    import numpy as np

    from medmtl.tracking.model_loading import load_verified_model

    model = load_verified_model(s["model"], s["uri"]).unwrap_python_model()  # this process imported MONAI in full
    pred = model.segmenter.predict(str(s["ct"]), "ct")
    cli = np.asarray(nib.load(str(written)).dataobj)
    emit({"bench": "predict_equal", "labels_equal": bool(np.array_equal(cli, pred.labels)), "voxels_labelled": int((cli > 0).sum())})


def bench_served(s: dict, work: Path, invocations: int) -> None:
    """``served`` lines: warm invocations of ``mlflow models serve`` with an image path and with a JSON array."""
    import nibabel as nib
    import numpy as np
    import requests

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(work / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", s["model"], "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=_env(s["uri"]), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.perf_counter()
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 600:
                raise RuntimeError(f"mlflow models serve did not start: {(work / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.25)
        startup = time.perf_counter() - t0
        img = nib.load(str(s["ct"]))
        bodies = {
            "image": {"dataframe_records": [{"image": str(s["ct"]), "modality": "CT"}]},
            "array": {"dataframe_records": [{"array": np.asarray(img.dataobj, dtype=np.float32).tolist(),
                                             "affine": img.affine.tolist(), "modality": "CT"}]},
        }
        times = {k: [] for k in bodies}
        for i in range(invocations + 1):
            for kind, body in bodies.items():
                t = time.perf_counter()
                r = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=600)
                if r.status_code != 200:
                    raise RuntimeError(f"invocation failed: {r.text[:1000]}")
                if i:  # the first round warms up
                    times[kind].append(time.perf_counter() - t)
        for kind, ts in times.items():
            emit({"bench": "served", "input": kind, "shape": s["ct_shape"], "seconds": round(statistics.median(ts), 3),
                  "seconds_all": [round(t, 2) for t in ts], "server_start_s": round(startup, 1), "goal_s": 1.0})
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, set up the model, run the benchmarks in a temporary folder."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the cold and batch measurements")
    ap.add_argument("--batch", type=int, default=4, help="volumes in the several-inputs call")
    ap.add_argument("--invocations", type=int, default=5, help="timed warm invocations of the served model per input kind")
    ap.add_argument("--no-serve", action="store_true", help="skip the served-model measurement")
    ap.add_argument("--quick", action="store_true", help="one round, batch of 3, no server (make bench)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.batch, args.no_serve = 1, 3, True
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    import torch

    emit({"bench": "predict_setup", "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "load_avg_1min": round(os.getloadavg()[0], 2)})
    work = Path(tempfile.mkdtemp(prefix="medmtl-bench-predict-"))
    try:
        s = setup(work)
        bench_cold_and_batch(s, work, args.rounds, args.batch)
        if not args.no_serve:
            bench_served(s, work, args.invocations)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit({"bench": "predict_done", "load_avg_1min": round(os.getloadavg()[0], 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
