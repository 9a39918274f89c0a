#!/usr/bin/env python3
"""Start a local MLflow tracking server on 127.0.0.1 for medmtl runs.

One worker process and MLflow's background job runner off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``):
medmtl needs neither, and on a small machine they cost start-up time and memory. By default the server
uses the embedded store of this folder (``mlflow/mlflow.db``, artifacts under ``mlflow/artifacts``), so
runs logged without a server appear in it too. See README.md beside this file.

    python mlflow/serve.py                       # http://127.0.0.1:5000
    python mlflow/serve.py --port 5050 --store /data/mlflow
    python mlflow/serve.py --print               # show the command only
    python mlflow/serve.py --basic-auth          # users and permissions (README.md: users and permissions)
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000   # then: medmtl train ...

With ``--basic-auth`` the launcher first checks what MLflow would only find out per request: that the
auth extra is installed (``pip install 'medmtl[server]'``) and that the auth config file
(``$MLFLOW_AUTH_CONFIG_PATH``, else MLflow's own ``mlflow/server/auth/basic_auth.ini``) has no comment
after a value. MLflow's ``ConfigParser`` keeps ``default_permission = READ   ; comment`` as the value
``"READ   ; comment"``: the server starts without a word and answers every non-admin request with
HTTP 500. Either problem ends the launcher with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import configparser
import importlib.util
import os
import re
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


def auth_config_path() -> Path:
    """The auth config the basic-auth app reads: ``$MLFLOW_AUTH_CONFIG_PATH``, else MLflow's own ``basic_auth.ini``."""
    if os.environ.get("MLFLOW_AUTH_CONFIG_PATH"):
        return Path(os.environ["MLFLOW_AUTH_CONFIG_PATH"])
    spec = importlib.util.find_spec("mlflow")
    return Path(spec.origin).parent / "server" / "auth" / "basic_auth.ini"


# the permissions MLflow's auth app knows (mlflow.server.auth.permissions.ALL_PERMISSIONS; importing it
# pulls in the whole auth app, seconds on a small machine)
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS", "DENY")


def basic_auth_problem() -> str | None:
    """Why MLflow's basic-auth app would fail to start or answer HTTP 500, in one line; ``None`` when it is set up."""
    if importlib.util.find_spec("flask_wtf") is None:
        return ("--basic-auth needs MLflow's auth extra (Flask-WTF), which is not installed in this environment: "
                f"{sys.executable} -m pip install 'medmtl[server]'")
    path = auth_config_path()
    if not path.is_file():
        return f"auth config {path} (MLFLOW_AUTH_CONFIG_PATH) does not exist: write it as mlflow/README.md shows"
    # read exactly as MLflow reads it (configparser.ConfigParser defaults: no inline comments)
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error as err:
        return f"auth config {path} cannot be read: {' '.join(str(err).split())}"
    if not parser.has_section("mlflow"):
        return f"auth config {path} has no [mlflow] section: write it as mlflow/README.md shows"
    for key, value in parser.items("mlflow"):
        if re.search(r"\s[;#]", value):
            return (f"auth config {path}: {key} = {value!r} keeps its trailing comment as part of the value "
                    "(MLflow reads no inline comments); put comments on their own lines")
    for key in ("default_permission", "database_uri"):
        if not parser.get("mlflow", key, fallback=""):
            return f"auth config {path}: [mlflow] {key} is missing: write it as mlflow/README.md shows"
    if parser.get("mlflow", "default_permission") not in PERMISSIONS:
        return (f"auth config {path}: default_permission = {parser.get('mlflow', 'default_permission')!r} is not one of "
                f"{', '.join(PERMISSIONS)}")
    return None


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
    if args.basic_auth:
        problem = basic_auth_problem()
        if problem is not None:
            print(f"serve.py: error: {problem}", file=sys.stderr)
            return 2
    if args.print:
        print("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false " + " ".join(cmd))
        return 0
    users = f", users and permissions from {auth_config_path()}" if args.basic_auth else ""
    print(f"MLflow UI and API on http://{args.host}:{args.port} (store {args.backend_store_uri or store.resolve()}{users})", flush=True)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
