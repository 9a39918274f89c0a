"""Fault: a second ingest into the same data folder replaced ``ingest_report.json``, so the report covered only
the last source while the manifest held all. The report keeps every source's results."""

from __future__ import annotations

import json

from _ingest_helpers import write_series
from medmtl.data.manifest import read_manifest
from medmtl.ingest.run import ingest


def test_second_source_keeps_the_first_sources_results(tmp_path):
    write_series(tmp_path / "a" / "S", n=5, patient_id="PA")
    write_series(tmp_path / "b" / "S", n=4, patient_id="PB", origin=(0, 0, 50))
    write_series(tmp_path / "b" / "LOC", n=2, patient_id="PB")  # a localizer: rejected
    out = tmp_path / "data"
    first = ingest(tmp_path / "a", out, progress=False, workers=1)
    second = ingest(tmp_path / "b", out, progress=False, workers=1)
    rep = json.loads((out / "ingest_report.json").read_text())
    keys = {r["series_key"] for r in rep["series"]}
    assert keys == {r.series_key for r in first.series} | {r.series_key for r in second.series}
    assert rep["n_accepted"] == 2 == len(read_manifest(out)) and rep["n_rejected"] == 1
    assert sorted((s["n_accepted"], s["n_rejected"]) for s in rep["sources"]) == [(1,0), (1, 1)]
    # running a source again replaces its own entries, never duplicates them
    ingest(tmp_path / "a", out, progress=False, workers=1)
    again = json.loads((out / "ingest_report.json").read_text())
    assert sorted(r["series_key"] for r in again["series"]) == sorted(r["series_key"] for r in rep["series"])
