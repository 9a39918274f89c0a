"""Fault: a slice whose file has no PixelData element was reported as ``truncated`` (as if cut short by a
copy); it is ``no_pixel_data``, and a file really cut short stays ``truncated``."""

from __future__ import annotations

import json

import pydicom

from _ingest_helpers import write_series
from medmtl.ingest.run import ingest


def test_slice_without_pixel_data_is_no_pixel_data_not_truncated(tmp_path):
    files = write_series(tmp_path / "export" / "S", n=6)
    ds = pydicom.dcmread(files[2])
    del ds.PixelData
    ds.save_as(files[2], enforce_file_format=True)
    files[4].write_bytes(files[4].read_bytes()[:-50])  # really truncated
    ingest(tmp_path / "export", tmp_path / "data", progress=False, workers=1)
    skipped = json.loads((tmp_path / "data" / "ingest_report.json").read_text())["skipped"]
    reasons = {s["path"]: s["reason"] for s in skipped}
    assert reasons[f"S/{files[2].name}"] == "no_pixel_data"
    assert reasons[f"S/{files[4].name}"] == "truncated"
