"""A broken dataset is refused before the MLflow run exists (issue 12, item 4, training side).

Old failures: label values outside ``data.labels`` (7 and 200 with classes 1-4) were trained as background
without a word; a manifest entry whose label file was missing surfaced as a 140-line MONAI traceback at the
first validation, after training. Now ``medmtl train`` prints one line naming the file (and the values) and
exits 2, and no run is created.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fault_helpers import ROOT, assert_one_line_error, run_medmtl
from medmtl.data.manifest import read_manifest

TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")


@pytest.fixture
def data_copy(tiny_dataset, tmp_path):
    """A private copy of the tiny dataset (the tests break it) and a prepared empty store."""
    from medmtl.tracking.store import embedded_store, prepare_store

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset[0], data)
    uri, _ = embedded_store(tmp_path / "store")
    prepare_store(uri)
    return data, uri


def _train(tmp_path, data, uri):
    return run_medmtl(["train", TINY, f"data.root={data}", "train.steps=2", "--out", str(tmp_path / "runs")],
                      cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})


def _no_runs(uri):
    client = MlflowClient(tracking_uri=uri)
    return all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())


def test_label_values_outside_the_classes_are_refused(data_copy, tmp_path):
    data, uri = data_copy
    entry = next(e for e in read_manifest(data) if e.modality == "CT" and e.label)
    img = nib.load(data / entry.label)
    arr = np.asanyarray(img.dataobj).copy()
    arr.reshape(-1)[:2] = [7, 200]
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), data / entry.label)
    line = assert_one_line_error(_train(tmp_path, data, uri), "train")
    assert entry.label in line and "7, 200" in line and "data.labels.ct" in line, line
    assert _no_runs(uri)


def test_missing_label_file_is_refused_before_the_run(data_copy, tmp_path):
    data, uri = data_copy
    entry = next(e for e in read_manifest(data) if e.modality == "MR" and e.label)
    (data / entry.label).unlink()
    line = assert_one_line_error(_train(tmp_path, data, uri), "train")
    assert f"{entry.label}: missing" in line, line
    assert _no_runs(uri)


def test_label_on_another_grid_is_refused_before_the_run(data_copy, tmp_path):
    data, uri = data_copy
    entry = next(e for e in read_manifest(data) if e.modality == "CT" and e.label)
    img = nib.load(data / entry.label)
    arr = np.asanyarray(img.dataobj)[:-1]
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), data / entry.label)
    line = assert_one_line_error(_train(tmp_path, data, uri), "train")
    assert entry.label in line and "differs from image" in line, line
    assert _no_runs(uri)


def test_unreadable_image_is_refused_before_the_run(data_copy, tmp_path):
    data, uri = data_copy
    entry = next(e for e in read_manifest(data) if e.modality == "CT")
    (data / entry.image).write_bytes(b"not a nifti")
    line = assert_one_line_error(_train(tmp_path, data, uri), "train")
    assert f"{entry.image}: unreadable" in line, line
    assert _no_runs(uri)
