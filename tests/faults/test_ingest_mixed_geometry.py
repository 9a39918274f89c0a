"""Fault: a series split because one slice has another pixel spacing or matrix was reported as
``mixed_orientations``. It says ``mixed_geometry`` and names the differing attribute."""

from __future__ import annotations

import pydicom
import pytest

from _ingest_helpers import write_series
from medmtl.ingest.run import ingest


@pytest.mark.parametrize("odd, attribute, values", [
    (dict(pixel_spacing=(0.9, 0.7)), "PixelSpacing", "0.8x0.7 vs 0.9x0.7"),
    (dict(rows=12), "Rows/Columns", "8x10 vs 12x10"),
])
def test_split_by_spacing_or_matrix_is_mixed_geometry(tmp_path, odd, attribute, values):
    files = write_series(tmp_path / "export" / "S", n=6, rows=8, cols=10)
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    kw = dict(rows=8, cols=10, pixel_spacing=(0.8, 0.7)) | odd
    write_series(tmp_path / "export" / "ODD", positions=[(-40.0, -30.0, 22.0)], series_uid=uid, **kw)
    report = ingest(tmp_path / "export", tmp_path / "data", progress=False, workers=1)
    (main,) = [r for r in report.series if r.status == "accepted"]
    assert "mixed_geometry" in main.warnings and "mixed_orientations" not in main.warnings
    assert attribute in main.details["mixed_geometry"] and values in main.details["mixed_geometry"]
