"""Fault: when a re-run rejected a series an earlier ingest had written, its outputs were removed but the
terminal summary did not say so. The summary names ``previous_output_removed``."""

from __future__ import annotations

from _ingest_helpers import write_series
from medmtl.data.manifest import read_manifest
from medmtl.ingest.run import ingest


def test_summary_says_that_previous_outputs_were_removed(tmp_path):
    files = write_series(tmp_path / "export" / "S", n=6)
    out = tmp_path / "data"
    assert ingest(tmp_path / "export", out, progress=False, workers=1).n_accepted == 1
    files[3].unlink()  # a slice lost from the export: the series now has a gap and is rejected
    report = ingest(tmp_path / "export", out, progress=False, workers=1)
    (rec,) = report.series
    assert rec.reasons == ["missing_slices"] and "previous_output_removed" in rec.details
    summary = report.summary()
    assert "previous_output_removed: 1 series" in summary, summary
    assert read_manifest(out) == []
