"""manifest.jsonl: the contract the training code reads."""

from __future__ import annotations

import json

import pytest

from medmtl.data.manifest import ManifestEntry, atomic_write_bytes, read_manifest, write_manifest
from medmtl.errors import DataError


def _entry(case="case-000000000001", label="labels/x.nii.gz"):
    return ManifestEntry(
        case_id=case, modality="CT", image="images/x.nii.gz", label=label, shape=(4, 5, 6),
        spacing=(0.5, 0.5, 2.0), series_key="series-00000000000a", orientation="LPS", n_slices=6,
        content_hash="sha256:ab", warnings=("gantry_tilt",),
    )


def test_round_trip_keeps_every_field(tmp_path):
    entries = [_entry("case-b"), _entry("case-a", label=None)]
    write_manifest(tmp_path, entries)
    back = read_manifest(tmp_path)
    assert back == sorted(entries, key=lambda e: e.case_id)
    first = json.loads((tmp_path / "manifest.jsonl").read_text().splitlines()[0])
    assert first["label"] is None and first["shape"] == [4, 5, 6]  # JSON null, plain lists


def test_unknown_keys_are_ignored_for_forward_compatibility(tmp_path):
    d = _entry().to_dict() | {"added_later": 1}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(d) + "\n\n")
    assert read_manifest(tmp_path) == [_entry()]


def test_missing_manifest_says_to_run_ingest(tmp_path):
    with pytest.raises(DataError, match="medmtl ingest"):
        read_manifest(tmp_path)


def test_bad_line_is_reported_with_its_number(tmp_path):
    (tmp_path / "manifest.jsonl").write_text(json.dumps(_entry().to_dict()) + "\n{\"case_id\": 1}\n")
    with pytest.raises(DataError, match=r"manifest.jsonl:2"):
        read_manifest(tmp_path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.json"
    target.write_bytes(b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # fails inside the write
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left
