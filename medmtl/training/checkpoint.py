"""Checkpoints: everything needed to resume a run exactly, written atomically.

Weights are stored as plain tensors so that they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmtl.atomic import atomic_path
from medmtl.errors import TrainingError

__all__ = ["save_checkpoint", "load_checkpoint", "check_writable_dir", "NoSpaceLeft", "capture_rng", "restore_rng",
           "random_states_of"]


class NoSpaceLeft(TrainingError):
    """The disk filled up while writing a checkpoint (the previous checkpoint file is untouched)."""

    def __init__(self, path: Path, last_good: str) -> None:
        super().__init__(f"no space left on device writing {path}; last good checkpoint: {last_good}")
        self.path = path


def _write_file(path: Path, data) -> None:
    with open(path, "wb") as fh:  # atomic_path fsyncs before the rename
        fh.write(data)


def save_checkpoint(path: str | Path, state: dict[str, Any], *, last_good: str = "none yet") -> Path:
    """Write ``state`` to ``path`` via a temporary file and ``os.replace`` (no half-written checkpoint).

    The state is serialized in memory first, so a full disk surfaces as ``ENOSPC`` on the write (torch's zip
    writer would say ``[enforce fail at inline_container.cc]``) and becomes :class:`NoSpaceLeft`, naming the
    file and ``last_good`` (e.g. ``"step 40 (runs/<id>/last.pt)"``); the file at ``path`` is then unchanged.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        with atomic_path(path) as tmp:
            _write_file(Path(tmp), buf.getbuffer())
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceLeft(path, last_good) from None
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a missing, truncated or foreign file is a :class:`TrainingError`."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} not found; pass the last.pt of an earlier run (runs/<run_id>/last.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        why = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise TrainingError(f"checkpoint {path} is truncated or not a medmtl checkpoint ({why}); resume from another "
                            "checkpoint of the run (best.pt, or an intact last.pt) or start a new run") from None


def check_writable_dir(folder: str | Path, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove a file can be written there; else :class:`TrainingError` naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".medmtl-write-test-"):
            pass
    except OSError as err:
        raise TrainingError(f"{what} {folder} is not writable ({err.strerror or err}); pass --out a folder you can "
                            "write to") from None
    return folder


# ------------------------------------------------------------------------------ random-number states
# Checkpoints load with weights_only=True, which admits tensors and plain containers only, so every
# generator state is stored as tensors and ints.


def _np_state_to_plain(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _np_state_from_plain(d: dict[str, Any]) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def random_states_of(root: Any) -> list[np.random.RandomState]:
    """Every ``numpy.random.RandomState`` reachable from ``root`` (a MONAI ``Compose`` and its transforms).

    MONAI dictionary transforms often hold an array transform with a generator of its own, so the
    walk follows attributes, lists and dicts, in a deterministic order.
    """
    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, np.random.RandomState):
            found.append(obj)
            return
        if isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, depth + 1)
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], depth + 1)
        elif type(obj).__module__.startswith(("monai", "medmtl")) and hasattr(obj, "__dict__"):
            for k in sorted(vars(obj)):
                walk(vars(obj)[k], depth + 1)

    walk(root, 0)
    return found


def capture_rng(transforms: dict[str, Any]) -> dict[str, Any]:
    """Global (Python, NumPy, torch) generator states plus those of each named transform chain."""
    return {
        "python": random.getstate(),
        "numpy": _np_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "transforms": {name: [_np_state_to_plain(r.get_state()) for r in random_states_of(t)] for name, t in transforms.items()},
    }


def restore_rng(state: dict[str, Any], transforms: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`; the chains must have the same structure as when captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_np_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, t in transforms.items():
        gens = random_states_of(t)
        saved = state["transforms"][name]
        if len(gens) != len(saved):
            raise TrainingError(f"checkpoint holds {len(saved)} generator states for the {name} transforms, the chain has {len(gens)}; resume with the same config")
        for r, s in zip(gens, saved):
            r.set_state(_np_state_from_plain(s))
