"""Registry with gates: register, promote (refused by each gate, accepted), load by alias, predict an unseen shape."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from medmtl.cli import main as medmtl
from medmtl.tracking.registry import CHALLENGER, CHAMPION, EVAL_SET_TAG, register_run_model
from tracking_helpers import MODEL_NAME, TINY_CONFIG
from tracking_phi import assert_no_phi

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, uri: str, gate: dict) -> str:
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw.setdefault("tracking", {}).update({"tracking_uri": uri, "gate": gate})
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _fake_run(client: MlflowClient, experiment_id: str, dice: float, eval_sha: str) -> str:
    """A run that only carries held-out Dice and an evaluation-set hash (what the gates read)."""
    run = client.create_run(experiment_id, run_name=f"fake-{dice}", tags={EVAL_SET_TAG: eval_sha})
    for m in ("ct", "mr"):
        for c in ("liver", "spleen", "kidney_left", "kidney_right", "mean"):
            client.log_metric(run.info.run_id, f"test/dice/{m}/{c}", dice, step=4)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _unseen_shape_volume(data_dir: Path, out: Path) -> Path:
    """An MR image cropped unevenly on every side: a shape no training or held-out volume has."""
    manifest = pd.read_json(data_dir / "manifest.jsonl", lines=True)
    img = nib.load(str(data_dir / manifest[manifest.modality == "MR"].iloc[0].image))
    cropped = img.slicer[3:-5, 2:-7, 1:-2]
    assert cropped.shape not in {tuple(s) for s in manifest["shape"]}
    nib.save(cropped, out)
    return out


def test_register_promote_behind_gates_then_predict_by_alias(trained, store, tmp_path, capsys, monkeypatch):
    client = MlflowClient(tracking_uri=store)
    run_id = trained["run_id"]
    eval_sha = client.get_run(run_id).data.tags[EVAL_SET_TAG]

    # register: version 1 under alias challenger, with its scores and lineage
    v1 = register_run_model(tracking_uri=store, run_id=run_id, name=MODEL_NAME)
    mv = client.get_model_version_by_alias(MODEL_NAME, CHALLENGER)
    assert v1.version == "1" and str(mv.version) == "1" and mv.run_id == run_id
    assert mv.tags[EVAL_SET_TAG] == eval_sha and "test/dice/ct/liver" in mv.tags and "medmtl.manifest_sha" in mv.tags
    assert run_id in mv.description

    # refused by a Dice floor, and it says which
    strict = _config(tmp_path, store, {"min_dice": {"ct/liver": 0.99}})
    assert medmtl(["promote", MODEL_NAME, "1", "--config", strict]) == 1
    out = capsys.readouterr().out
    assert "NOT promoted" in out and "ct/liver" in out and "below the floor 0.990" in out
    assert client.get_model_version(MODEL_NAME, "1").tags["medmtl.gate"] == "refused"
    with pytest.raises(Exception):
        client.get_model_version_by_alias(MODEL_NAME, CHAMPION)

    # accepted: no floors, no champion yet
    lenient = _config(tmp_path, store, {})
    assert medmtl(["promote", MODEL_NAME, "1", "--config", lenient]) == 0
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == "1"

    # a better version on the same evaluation set replaces it
    exp = client.get_run(run_id).info.experiment_id
    better = register_run_model(tracking_uri=store, run_id=_fake_run(client, exp, 0.8, eval_sha), name=MODEL_NAME,
                                model_uri=trained["model_uri"])
    assert medmtl(["promote", MODEL_NAME, better.version, "--config", lenient]) == 0
    capsys.readouterr()
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == better.version

    # worse than the champion on the same set: refused
    worse = register_run_model(tracking_uri=store, run_id=_fake_run(client, exp, 0.7, eval_sha), name=MODEL_NAME,
                               model_uri=trained["model_uri"])
    assert medmtl(["promote", MODEL_NAME, worse.version, "--config", lenient]) == 1
    out = capsys.readouterr().out
    assert "worse than the champion's" in out and "ct/mean" in out

    # better numbers, but on another evaluation set: not comparable, refused
    other = register_run_model(tracking_uri=store, run_id=_fake_run(client, exp, 0.95, "0123456789abcdef"), name=MODEL_NAME,
                               model_uri=trained["model_uri"])
    assert medmtl(["promote", MODEL_NAME, other.version, "--config", lenient]) == 1
    assert "cannot be compared" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == better.version

    # load by alias and predict on a volume of a shape never seen in training
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    image = _unseen_shape_volume(trained["data_dir"], tmp_path / "unseen.nii.gz")
    pred_path = tmp_path / "pred" / "labels.nii.gz"
    assert medmtl(["predict", f"models:/{MODEL_NAME}@{CHAMPION}", str(image), "--modality", "MR", "--out", str(pred_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    src, pred = nib.load(str(image)), nib.load(str(pred_path))
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3, 4}

    # nothing above put fake patient data into MLflow
    synth = trained["synth"]
    secrets = set(synth.phi_strings()) | set(synth.uid_strings())
    assert len(secrets) > 20
    assert assert_no_phi(secrets, Path(store[len("sqlite:///"):]), trained["root"] / "artifacts") > 20
