"""Issue 12 item 4 (predict): NaN/inf voxels are counted, reported and replaced by the modality's background,
so the rest of the volume is segmented exactly as the cleaned image would be; never a silent empty mask.

Before the fix, a NaN spread through resampling and the MR z-score (or the CT window) to every voxel and
`medmtl predict` wrote an all-background mask with exit 0: the equality with the cleaned image's answer and
the reported count below both fail then (checked by reverting the fix in segmenter.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd

from fault_models import _clean_mlflow_uri, shared_model  # noqa: F401 - fixtures
from medmtl.cli import main as medmtl
from medmtl.data.manifest import read_manifest
from medmtl.inference.segmenter import BACKGROUND_VALUE


def _image(data_dir, modality: str):
    e = next(e for e in read_manifest(data_dir) if e.modality == modality)
    img = nib.load(str(data_dir / e.image))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _with_nonfinite(vol: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    bad = np.zeros(vol.shape, bool)
    bad[5:9, 6:10, 2:4] = True  # a block of NaN
    bad[0, 0, 0] = bad[-1, -1, -1] = True  # and two infinities
    dirty = vol.copy()
    dirty[bad] = np.nan
    dirty[0, 0, 0], dirty[-1, -1, -1] = np.inf, -np.inf
    return dirty, bad, int(bad.sum())


def test_pyfunc_replaces_nonfinite_voxels_and_reports_their_count(shared_model):
    import mlflow

    mlflow.set_tracking_uri(shared_model.uri)
    model = mlflow.pyfunc.load_model(f"models:/{shared_model.name}@challenger")  # what `mlflow models serve` runs
    for modality in ("CT", "MR"):
        vol, affine = _image(shared_model.data_dir, modality)
        dirty, bad, n = _with_nonfinite(vol)
        clean = vol.copy()
        clean[bad] = BACKGROUND_VALUE[modality.lower()]
        rows = pd.DataFrame([{"array": a.tolist(), "affine": affine.tolist(), "modality": modality} for a in (dirty, clean)])
        res = model.predict(rows)
        got, want = np.asarray(res.loc[0, "labels"]), np.asarray(res.loc[1, "labels"])
        assert (want > 0).sum() > 1000, "the cleaned image must be segmented into something for this test to mean anything"
        np.testing.assert_array_equal(got, want)
        assert int(res.loc[0, "nonfinite_voxels"]) == n and int(res.loc[1, "nonfinite_voxels"]) == 0
        assert f"{n} NaN/inf voxels replaced" in res.loc[0, "notes"]


def test_cli_reports_the_count_and_writes_the_same_mask_as_for_the_cleaned_image(shared_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_model.uri)
    vol, affine = _image(shared_model.data_dir, "MR")
    dirty, bad, n = _with_nonfinite(vol)
    clean = vol.copy()
    clean[bad] = 0.0
    nib.save(nib.Nifti1Image(dirty, affine), tmp_path / "dirty.nii.gz")
    nib.save(nib.Nifti1Image(clean, affine), tmp_path / "clean.nii.gz")
    uri = f"models:/{shared_model.name}@challenger"
    assert medmtl(["predict", uri, str(tmp_path / "dirty.nii.gz"), "--modality", "MR", "--out", str(tmp_path / "d.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert f"{n} NaN/inf voxels replaced by the MR background value 0" in err
    assert medmtl(["predict", uri, str(tmp_path / "clean.nii.gz"), "--modality", "MR", "--out", str(tmp_path / "c.nii.gz")]) == 0
    got, want = (np.asarray(nib.load(str(tmp_path / f)).dataobj) for f in ("d.nii.gz", "c.nii.gz"))
    assert want.any()
    np.testing.assert_array_equal(got, want)


def test_an_image_that_is_mostly_nan_is_refused_in_one_line(shared_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_model.uri)
    vol, affine = _image(shared_model.data_dir, "CT")
    vol[: vol.shape[0] * 3 // 4] = np.nan
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "nan.nii.gz")
    code = medmtl(["predict", f"models:/{shared_model.name}@challenger", str(tmp_path / "nan.nii.gz"), "--modality", "CT",
                   "--out", str(tmp_path / "out.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out.nii.gz").exists()
    line = next(line for line in err.splitlines() if "error:" in line)
    assert "nan.nii.gz" in line and "NaN or inf" in line and "Traceback" not in err
