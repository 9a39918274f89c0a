"""Helpers for the tracking tests: free ports, HTTP polling, a real MLflow server process.

Imported explicitly (``from tracking_helpers import ...``; this folder is on ``sys.path`` under pytest's
default import mode) so that it cannot clash with the other conftest modules.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from medmtl.procenv import interpreter_env

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "tests" / "configs" / "tiny.yaml"
MODEL_NAME = "medmtl-tiny"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; fail with the process output when it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without MLFLOW_* variables (tests choose their store explicitly), with this
    interpreter's scripts first on PATH (``mlflow models serve`` execs ``uvicorn`` through PATH)."""
    return interpreter_env({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **extra)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """``killpg`` the process group of ``proc``; a group that is already gone is not an error."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL after ``timeout``; never raises (clean-up must not hide
    the test's own failure)."""
    try:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=timeout)
    except Exception as err:  # noqa: BLE001 - reported, not raised over the real failure
        print(f"clean-up of process {proc.pid} failed: {err!r}", file=sys.stderr)


@dataclass
class MlflowServer:
    """A tracking server process on 127.0.0.1 with its own store folder."""

    store: Path
    port: int
    proc: subprocess.Popen | None = None
    args: tuple[str, ...] = ()  # more launcher arguments, e.g. ("--basic-auth",)
    env: dict[str, str] | None = None  # more environment variables (MLFLOW_AUTH_* for --basic-auth)
    cwd: Path | None = None  # the folder the server starts in (relative paths of an auth ini start here)

    @property
    def uri(self) -> str:
        """Tracking URI of the server."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        """Start (or restart) through the launcher and wait until /health answers."""
        log = open(self.store / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "mlflow" / "serve.py"), "--store", str(self.store), "--port", str(self.port), *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=clean_env(**(self.env or {})), cwd=self.cwd, start_new_session=True,
        )
        wait_http(f"{self.uri}/health", timeout, self.proc)
        return self

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server's process group (the launcher's server and its uvicorn worker)."""
        if self.proc is not None and self.proc.poll() is None:
            signal_group(self.proc, sig)

    def kill(self) -> None:
        """SIGKILL the whole server (no graceful shutdown, as a crash or a pulled cable)."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)
        # the worker may outlive the launcher by a moment; wait until the port is free again
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)
