"""Environments for the subprocesses medmtl and its tests start (``mlflow server``, ``mlflow models serve``,
the ``uvicorn`` it execs, ``torchrun``, ``dcm2niix``).

A tool is taken from the running interpreter's environment first, never from whatever ``PATH`` happens to
hold: a new user runs ``.venv/bin/medmtl`` or ``.venv/bin/python -m pytest`` with no virtualenv active, and
``mlflow models serve`` then execs ``uvicorn`` through ``PATH`` (``bash -c 'exec uvicorn ...'``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["interpreter_bin", "interpreter_env", "interpreter_tool"]


def interpreter_bin() -> Path:
    """The folder holding this interpreter's console scripts (``.venv/bin``), not resolved through links."""
    return Path(sys.executable).parent


def interpreter_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: this process's environment) with :func:`interpreter_bin` first on ``PATH``, plus ``extra``."""
    env = dict(os.environ if base is None else base)
    parts = [str(interpreter_bin())] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != str(interpreter_bin())]
    env["PATH"] = os.pathsep.join(parts)
    env.update(extra)
    return env


def interpreter_tool(name: str) -> str:
    """The path of console script ``name`` beside this interpreter; a clear error when it is not installed there."""
    path = interpreter_bin() / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed in this Python environment ({interpreter_bin()}); "
                                f"reinstall the project: {sys.executable} -m pip install -e '.[dev]'")
    return str(path)
