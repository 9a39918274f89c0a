"""Fault: an nnU-Net raw dataset ingested without ``--config`` kept dataset.json's label numbers although they
mean other organs (1 is spleen there, liver here). Labels are mapped by name to the default classes, or
ingest refuses and prints the mapping it needs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmtl.data.manifest import read_manifest
from medmtl.errors import IngestError
from medmtl.ingest.run import ingest


def _dataset(root: Path, labels: dict) -> np.ndarray:
    lab = np.zeros((10, 9, 6), np.uint8)
    lab[1:4, 1:4, 1:3] = 1
    lab[5:8, 5:8, 3:5] = 2
    img = np.random.default_rng(0).integers(-1000, 1000, size=lab.shape).astype(np.int16)
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    for sub, name, data in (("imagesTr", "case_001_0000.nii.gz", img), ("labelsTr", "case_001.nii.gz", lab)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, aff), root / sub / name)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz"}))
    return lab


def test_labels_are_mapped_by_name_to_the_default_classes(tmp_path):
    root = tmp_path / "Dataset009_Spleen"
    lab = _dataset(root, {"background": 0, "spleen": 1, "liver": 2})
    report = ingest(root, tmp_path / "data", progress=False, workers=1)
    (rec,) = report.series
    assert rec.status == "accepted" and "mapped by name" in rec.details["label_source"]
    (entry,) = read_manifest(tmp_path / "data")
    got = np.asanyarray(nib.load(str(tmp_path / "data" / entry.label)).dataobj)
    # default classes: 1 liver, 2 spleen: dataset.json's spleen (1) becomes 2, its liver (2) becomes 1
    np.testing.assert_array_equal(got, np.choose(lab, [0, 2, 1]))


def test_names_that_are_not_default_classes_are_refused_with_the_mapping(tmp_path):
    root = tmp_path / "Dataset011_Tumour"
    _dataset(root, {"background": 0, "tumour": 1, "cyst": 2})
    with pytest.raises(IngestError, match=r"not medmtl's default CT classes.*--config with data\.labels\.ct.*1: tumour, 2: cyst"):
        ingest(root, tmp_path / "data", progress=False, workers=1)
