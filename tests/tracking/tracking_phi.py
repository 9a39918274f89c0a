"""Scan an MLflow store (database file and artifact folders) for fake PHI from synthetic exports."""

from __future__ import annotations

import gzip
import zipfile
from io import BytesIO
from pathlib import Path


def _payloads(path: Path):
    data = path.read_bytes()
    yield data
    if path.name.endswith(".gz"):
        yield gzip.decompress(data)
    if data[:4] == b"PK\x03\x04":  # torch checkpoints and other zip files: scan every member uncompressed
        with zipfile.ZipFile(BytesIO(data)) as z:
            for name in z.namelist():
                yield name.encode()
                yield z.read(name)


def assert_no_phi(secrets: set[str], *roots: Path) -> int:
    """Fail naming the file when any of ``secrets`` occurs in a file under ``roots``; returns files checked."""
    needles = [s.encode() for s in secrets if s]
    checked = 0
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            checked += 1
            for data in _payloads(path):
                for s in needles:
                    assert s not in data, f"{s!r} leaked into {path}"
    return checked
