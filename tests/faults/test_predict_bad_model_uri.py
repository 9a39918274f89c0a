"""Issue 12 item 5: a bad ``models:/`` name, version or alias (or a URI of no known form) given to `medmtl predict`
ends in one line that names what is wrong and what exists instead, exit status 2, no traceback.

Before the fix MLflow's RestException/MlflowException escaped `medmtl predict` as a multi-line traceback
(checked by reverting to mlflow.pyfunc.load_model(model_uri) in pipelines/predict.py: these tests then fail
on the exit status and the missing one-line message)."""

from __future__ import annotations

import pytest

from fault_models import _clean_mlflow_uri, shared_model  # noqa: F401 - fixtures
from medmtl.cli import main as medmtl
from medmtl.data.manifest import read_manifest


@pytest.mark.parametrize("uri, expected", [
    ("models:/no-such-model/1", ["no registered model named 'no-such-model'", "registered models: medmtl-faults"]),
    ("models:/medmtl-faults/7", ["has no version 7", "versions: 1"]),
    ("models:/medmtl-faults@champion", ["has no alias 'champion'", "challenger -> version 1"]),
    ("models:/medmtl-faults/latest", ["version must be a number"]),
    ("model:/medmtl-faults/1", ["is not one of models:/<name>/<version>"]),
    ("runs:/0123456789abcdef0123456789abcdef/model", ["no run 0123456789abcdef0123456789abcdef"]),
])
def test_bad_model_uri_ends_in_one_clear_line(shared_model, tmp_path, monkeypatch, capsys, uri, expected):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_model.uri)
    e = next(e for e in read_manifest(shared_model.data_dir) if e.modality == "CT")
    code = medmtl(["predict", uri, str(shared_model.data_dir / e.image), "--modality", "CT", "--out", str(tmp_path / "o.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("medmtl predict: error: "), err
    for part in expected:
        assert part in lines[0]
    assert not (tmp_path / "o.nii.gz").exists()
