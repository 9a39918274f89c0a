"""Helpers of the fault suite (see README.md here): the real ``medmtl`` console script in a clean environment.

Imported explicitly (``from fault_helpers import ...``; this folder is on ``sys.path`` under pytest's default
import mode), as ``tests/tracking/tracking_helpers.py`` is, so that it cannot clash with other conftest modules.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from medmtl.procenv import interpreter_env, interpreter_tool

ROOT = Path(__file__).resolve().parents[2]


def run_medmtl(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``medmtl ARGS`` through the console script beside this interpreter (the real entry point).

    The project's own code comes first on ``PYTHONPATH``; ``MLFLOW_*`` variables of the caller are dropped
    (a test sets its own store through ``env``).
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p])
    base.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([interpreter_tool("medmtl"), *args], cwd=cwd, env=interpreter_env(base, **(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(res: subprocess.CompletedProcess, command: str) -> str:
    """Exit 2, exactly one line on stderr, ``medmtl <command>: error: ...``, no traceback; returns the line."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, f"exit {res.returncode}, stderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{res.stderr}"
    assert lines[0].startswith(f"medmtl {command}: error: "), lines[0]
    return lines[0]
