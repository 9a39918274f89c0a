#!/usr/bin/env python3
"""Start a local MLflow tracking server on 127.0.0.1 for medmtl runs.

One worker process and MLflow's background job runner off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``):
medmtl needs neither, and on a small machine they cost start-up time and memory. By default the server
uses the embedded store of this folder (``mlflow/mlflow.db``, artifacts under ``mlflow/artifacts``), so
runs logged without a server appear in it too. See README.md beside this file.

    python mlflow/serve.py                       # http://127.0.0.1:5000
    python mlflow/serve.py --port 5050 --store /data/mlflow
    python mlflow/serve.py --print               # show the command only
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000   # then: medmtl train ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def server_command(*, store: Path, host: str, port: int, workers: int, backend_store_uri: str | None, artifacts_destination: str | None,
                   app_name: str | None) -> list[str]:
    """The ``mlflow server`` command line for these settings."""
    backend = backend_store_uri or f"sqlite:///{store.resolve() / 'mlflow.db'}"
    artifacts = artifacts_destination or str(store.resolve() / "artifacts")
    # this interpreter's mlflow, not whichever one PATH finds first
    exe = str(Path(sys.executable).with_name("mlflow"))
    cmd = [exe, "server", "--backend-store-uri", backend, "--artifacts-destination", artifacts,
           "--host", host, "--port", str(port), "--workers", str(workers)]
    if app_name:
        cmd += ["--app-name", app_name]
    return cmd


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and replace this process with the MLflow server."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=str(HERE), help="folder of mlflow.db and artifacts/ (default: this folder)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind; keep 127.0.0.1 unless behind auth and a proxy")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--backend-store-uri", default=None, help="database URI instead of the SQLite file, e.g. postgresql://...")
    ap.add_argument("--artifacts-destination", default=None, help="artifact store instead of STORE/artifacts, e.g. s3://bucket/mlflow")
    ap.add_argument("--basic-auth", action="store_true", help="run MLflow's basic-auth app (see README.md: users and permissions)")
    ap.add_argument("--print", action="store_true", help="print the command and exit")
    args = ap.parse_args(argv)
    store = Path(args.store)
    store.mkdir(parents=True, exist_ok=True)
    cmd = server_command(store=store, host=args.host, port=args.port, workers=args.workers, backend_store_uri=args.backend_store_uri,
                         artifacts_destination=args.artifacts_destination, app_name="basic-auth" if args.basic_auth else None)
    # the server starts uvicorn/gunicorn through PATH: this interpreter's scripts come first
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]))
    if args.print:
        print("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false " + " ".join(cmd))
        return 0
    print(f"MLflow UI and API on http://{args.host}:{args.port} (store {args.backend_store_uri or store.resolve()})", flush=True)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
