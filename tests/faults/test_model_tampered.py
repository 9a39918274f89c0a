"""Issue 12 item 7: models run only what was registered. A SHA-256 manifest of every model file is recorded at
logging (logged-model tag) and registration (version tag); predict, evaluate and the served model verify the
files before using them, and a changed, added or removed file is refused in one line naming it.

Before the fix nothing was checked: predict loaded changed weights and executed added code (checked by
reverting pipelines/predict.py to mlflow.pyfunc.load_model(model_uri): the CLI tests then exit 0 with the
tampered model, and without the load_context check the pyfunc test loads it)."""

from __future__ import annotations

import json

import pytest
import torch

from fault_models import _clean_mlflow_uri, own_model  # noqa: F401 - fixtures
from medmtl.cli import main as medmtl
from medmtl.data.manifest import read_manifest
from medmtl.errors import ModelError
from medmtl.inference.model_manifest import DIGEST_TAG, MANIFEST_NAME, digest, file_manifest, manifest_bytes


def _predict(model, tmp_path, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", model.uri)
    e = next(e for e in read_manifest(model.data_dir) if e.modality == "CT")
    code = medmtl(["predict", f"models:/{model.name}@challenger", str(model.data_dir / e.image), "--modality", "CT",
                   "--out", str(tmp_path / "out.nii.gz")])
    return code, capsys.readouterr().err


def test_the_registered_version_carries_the_digest_of_the_files_it_was_registered_with(own_model):
    from mlflow.tracking import MlflowClient

    files = own_model.artifact_dir()
    mv = MlflowClient(tracking_uri=own_model.uri).get_model_version(own_model.name, "1")
    recorded = json.loads((files / MANIFEST_NAME).read_bytes())["files"]
    assert {"MLmodel", "pyfunc_entry.py", "artifacts/weights.pt", "artifacts/config.yaml", "artifacts/plan.json"} <= set(recorded)
    assert any(k.startswith("code/medmtl/") for k in recorded)
    assert recorded == file_manifest(files)
    assert mv.tags[DIGEST_TAG] == digest((files / MANIFEST_NAME).read_bytes()) == digest(manifest_bytes(recorded))


def test_changed_weights_are_refused_by_predict_naming_the_file(own_model, tmp_path, monkeypatch, capsys):
    weights = own_model.artifact_dir() / "artifacts" / "weights.pt"
    state = torch.load(weights, weights_only=True)
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, weights)
    code, err = _predict(own_model, tmp_path, monkeypatch, capsys)
    assert code == 2 and "artifacts/weights.pt was modified after logging" in err and "Traceback" not in err
    assert not (tmp_path / "out.nii.gz").exists()


def test_added_code_is_refused_before_anything_runs(own_model, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    evil = own_model.artifact_dir() / "code" / "medmtl" / "inference" / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    entry = own_model.artifact_dir() / "pyfunc_entry.py"
    entry.write_text(entry.read_text() + "\nimport medmtl.inference.evil  # noqa\n")
    code, err = _predict(own_model, tmp_path, monkeypatch, capsys)
    assert code == 2 and ("code/medmtl/inference/evil.py is not in its manifest" in err or "pyfunc_entry.py was modified" in err)
    assert not marker.exists()


def test_a_consistently_rewritten_manifest_is_refused_against_the_registry_tag(own_model, tmp_path, monkeypatch, capsys):
    files = own_model.artifact_dir()
    cfg = files / "artifacts" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("sw_overlap: 0.5", "sw_overlap: 0.1"))
    (files / MANIFEST_NAME).write_bytes(manifest_bytes(file_manifest(files)))  # what an artifact-store attacker can do
    code, err = _predict(own_model, tmp_path, monkeypatch, capsys)
    assert code == 2 and f"{MANIFEST_NAME} does not match the manifest recorded" in err


def test_a_removed_file_is_refused(own_model, tmp_path, monkeypatch, capsys):
    (own_model.artifact_dir() / "artifacts" / "plan.json").unlink()
    code, err = _predict(own_model, tmp_path, monkeypatch, capsys)
    assert code == 2 and "artifacts/plan.json listed in its manifest is missing" in err


def test_evaluate_and_the_served_model_refuse_tampered_weights(own_model):
    import mlflow

    from medmtl.tracking.model_loading import load_verified_model

    weights = own_model.artifact_dir() / "artifacts" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelError, match="artifacts/weights.pt was modified after logging"):
        load_verified_model(own_model.logged_uri, own_model.uri)  # what `medmtl evaluate` loads
    mlflow.set_tracking_uri(own_model.uri)
    with pytest.raises(ModelError, match="artifacts/weights.pt was modified after logging"):
        mlflow.pyfunc.load_model(f"models:/{own_model.name}@challenger")  # what `mlflow models serve` runs: load_context checks
