"""Issue 12 item 5: a 2D image (or a single slice, or a 4D series) given to predict ends in one clear line
naming the file and saying what to give instead; no traceback, nothing written.

Before the fix a 2D NIfTI reached MONAI's EnsureChannelFirst/Spacing and ended in a long RuntimeError
traceback, and a single slice was padded and "segmented" (checked by removing check_volume_shape from
model_io.nifti_model_input: the CLI tests then fail on the exit status/message)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fault_models import _clean_mlflow_uri, shared_model  # noqa: F401 - fixtures
from medmtl.cli import main as medmtl
from medmtl.errors import InputError


@pytest.mark.parametrize("shape, expected", [
    ((40, 40), "a 2D image (shape [40, 40]) cannot be segmented"),
    ((40, 40, 1), "a 2D image (shape [40, 40, 1]) cannot be segmented"),
    ((40, 40, 12, 3), "holds 3 volumes"),
])
def test_predict_refuses_an_image_that_is_not_one_volume(shared_model, tmp_path, monkeypatch, capsys, shape, expected):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_model.uri)
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(0, 100, shape).astype(np.float32), np.diag([2.0, 2.0, 5.0, 1.0])), path)
    code = medmtl(["predict", f"models:/{shared_model.name}@challenger", str(path), "--modality", "CT", "--out", str(tmp_path / "o.nii.gz")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert expected in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "o.nii.gz").exists()


def test_the_served_model_refuses_a_2d_array_with_the_same_message(shared_model):
    import mlflow

    mlflow.set_tracking_uri(shared_model.uri)
    model = mlflow.pyfunc.load_model(f"models:/{shared_model.name}@challenger")
    with pytest.raises(InputError, match=r"row 0: a 2D image \(shape \[30, 20\]\) cannot be segmented"):
        model.predict(pd.DataFrame([{"array": np.zeros((30, 20)).tolist(), "modality": "MR"}]))
