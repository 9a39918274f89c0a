"""Shared set-up of the ingest fault tests: the DICOM writers of ``tests/ingest/conftest_ingest.py``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ingest"))

from conftest_ingest import write_series  # noqa: E402,F401
