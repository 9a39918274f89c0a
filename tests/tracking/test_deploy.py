"""The deployable model: a DICOM series in (NIfTI + DICOM SEG out), an array in, and `mlflow models serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import requests

from medmtl.cli import main as medmtl
from medmtl.synth import synthesize_exports
from medmtl.tracking.registry import register_run_model
from tracking_helpers import MODEL_NAME, clean_env, free_port, stop_group, wait_http
from tracking_phi import assert_no_phi

pytestmark = pytest.mark.slow


@pytest.fixture
def registered(trained, store) -> str:
    """This test's store with the trained run registered (alias challenger); returns the model URI."""
    register_run_model(tracking_uri=store, run_id=trained["run_id"], name=MODEL_NAME)
    return f"models:/{MODEL_NAME}@challenger"


def test_predict_on_a_dicom_series_writes_aligned_nifti_and_dicom_seg(trained, store, registered, tmp_path, monkeypatch, capsys):
    # a new patient with a matrix the model never saw
    new = synthesize_exports(tmp_path / "new", n_ct=0, n_mr=1, seed=77, mr_matrix=44)
    series = next(s for s in new.series if not s.is_localizer)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = tmp_path / "pred" / "labels.nii.gz"
    assert medmtl(["predict", registered, str(series.dicom_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr()

    pred = nib.load(str(out))
    assert pred.shape == series.shape
    np.testing.assert_allclose(pred.affine, series.affine_ras, atol=1e-3)  # the label grid of the series
    labels = np.asarray(pred.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    seg_path = out.with_name("labels.seg.dcm")
    if labels.any():
        seg = hd.seg.segread(str(seg_path))
        assert seg.Modality == "SEG"
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
        assert int(seg.NumberOfFrames) == series.shape[2] * len(seg.SegmentSequence)
        assert {s.SegmentLabel for s in seg.SegmentSequence} <= {"liver", "spleen", "kidney_left", "kidney_right"}
    else:
        assert "not written" in printed.err

    # the SEG goes to the user and references the patient; MLflow received nothing of it
    secrets = set(new.phi_strings()) | set(new.uid_strings()) | set(trained["synth"].phi_strings())
    assert_no_phi(secrets, Path(store[len("sqlite:///"):]), trained["root"] / "artifacts")
    for s in new.phi_strings() + new.uid_strings():
        assert s not in printed.out and s not in printed.err


def test_array_input_with_affine_segments_any_shape(trained, store, registered):
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(registered)
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 20, size=(23, 31, 9)).astype(np.float32)
    affine = np.diag([6.0, 5.0, 9.0, 1.0])
    res = model.predict(pd.DataFrame([{"array": vol.tolist(), "affine": affine.tolist(), "modality": "CT"}]))
    labels = np.asarray(res.loc[0, "labels"])
    assert labels.shape == vol.shape and json.loads(res.loc[0, "shape"]) == [23, 31, 9]
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    with pytest.raises(Exception, match="modality must be CT or MR"):
        model.predict(pd.DataFrame([{"array": vol.tolist(), "affine": affine.tolist(), "modality": "PET"}]))


def test_served_model_answers_invocations_with_a_segmentation(trained, store, registered, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", registered, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=clean_env(MLFLOW_TRACKING_URI=store), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc)
        vol = np.random.default_rng(1).normal(300, 80, size=(19, 27, 11)).round(1)
        body = {"dataframe_records": [{"array": vol.tolist(), "affine": np.diag([7.0, 7.0, 8.0, 1.0]).tolist(), "modality": "MR"}]}
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert r.status_code == 200, r.text[:2000]
        pred = r.json()["predictions"][0]
        labels = np.asarray(pred["labels"])
        assert labels.shape == (19, 27, 11)
        assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
        assert sum(v for k, v in pred.items() if k.startswith("voxels_")) == int((labels > 0).sum())

        # NaN voxels (JSON NaN) are counted and replaced by the MR background, as in the pyfunc (tests/faults)
        dirty, clean = vol.copy(), vol.copy()
        dirty[2:5, 3:6, 4:6], clean[2:5, 3:6, 4:6] = np.nan, 0.0
        rows = [{"array": a.tolist(), "affine": np.diag([7.0, 7.0, 8.0, 1.0]).tolist(), "modality": "MR"} for a in (dirty, clean)]
        r = requests.post(f"http://127.0.0.1:{port}/invocations", data=json.dumps({"dataframe_records": rows}),  # NaN literals
                          headers={"Content-Type": "application/json"}, timeout=120)
        assert r.status_code == 200, r.text[:2000]
        got, want = r.json()["predictions"]
        assert got["nonfinite_voxels"] == 18 and want["nonfinite_voxels"] == 0 and "18 NaN/inf voxels replaced" in got["notes"]
        np.testing.assert_array_equal(np.asarray(got["labels"]), np.asarray(want["labels"]))
    finally:
        stop_group(proc)
        log.close()
