"""Fault: label values outside the configured classes (7 and 200 when data.labels has 1-4) were accepted at
ingest and trained as background. Ingest with a config rejects the label as ``label_values``."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom

from _ingest_helpers import write_series
from medmtl.config import DataConfig
from medmtl.ingest.run import ingest


def _export_with_mask(tmp_path, values):
    files = write_series(tmp_path / "export" / "S", n=5, rows=8, cols=10)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    # the mask on the image grid, built from the ingest of the same export without a label
    probe = ingest(tmp_path / "export", tmp_path / "probe", progress=False, workers=1)
    img = nib.load(str(tmp_path / "probe" / probe.series[0].output))
    mask = np.zeros(img.shape, np.uint8)
    for i, v in enumerate(values):
        mask[i, 0, 0] = v
    labels = tmp_path / "labels"
    labels.mkdir()
    nib.save(nib.Nifti1Image(mask, img.affine), labels / f"{ds.SeriesInstanceUID}.nii.gz")
    return labels


def test_label_values_outside_the_configured_classes_are_rejected_by_name(tmp_path):
    labels = _export_with_mask(tmp_path, [1, 7, 200, 200])
    report = ingest(tmp_path / "export", tmp_path / "data", labels_dir=labels, progress=False, workers=1,
                    label_names=DataConfig().labels)
    (rec,) = report.series
    assert rec.status == "rejected" and rec.reasons == ["label_values"]
    detail = rec.details["label_values"]
    assert "[7, 200]" in detail and "3 voxels" in detail and "data.labels.ct" in detail
    assert "LABEL_DIR/uid-" in detail  # the file, by its pseudonymized name (it is a SeriesInstanceUID)
    assert not list((tmp_path / "data" / "labels").glob("*.nii.gz"))


def test_configured_values_pass(tmp_path):
    labels = _export_with_mask(tmp_path, [1, 2, 3, 4])
    report = ingest(tmp_path / "export", tmp_path / "data", labels_dir=labels, progress=False, workers=1,
                    label_names=DataConfig().labels)
    assert report.series[0].status == "accepted" and report.series[0].label_source == "label_dir"
