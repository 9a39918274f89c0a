"""The training pipeline with a separate test split: final scores and the evaluation-set tag come from it."""

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from medmtl.config import load_config
from medmtl.data.loaders import load_split
from medmtl.tracking.registry import EVAL_SET_TAG, eval_set_fingerprint
from pipelines.train import run_training

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
pytestmark = pytest.mark.slow


def test_final_scores_come_from_the_test_cases(tiny_dataset, tmp_path, monkeypatch):
    data_dir, _ = tiny_dataset
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config(TINY, [f"data.root={data_dir}", "data.val_fraction=0.34", "data.test_fraction=0.34", "tracking.log_model=false"])
    _, split = load_split(cfg)
    assert all(split.test.values()) and all(split.val.values())
    res = run_training(cfg, out_dir=tmp_path / "runs", progress=False)
    run = MlflowClient(tracking_uri=uri).get_run(res.run_id)
    assert run.data.tags[EVAL_SET_TAG] == eval_set_fingerprint(split.test) != eval_set_fingerprint(split.val)
    assert run.data.metrics["test/dice/ct/mean"] == pytest.approx(res.test_dice["ct"]["mean"])
    # the per-case table of the final scores lists exactly the test cases
    path = MlflowClient(tracking_uri=uri).download_artifacts(res.run_id, "evaluation/test_dice.json", str(tmp_path))
    cases = {row["case_id"] for row in json.loads(Path(path).read_text())["per_case"]}
    assert cases == {e.case_id for m in ("ct", "mr") for e in split.test[m]}


@pytest.mark.parametrize("method", ["metabalance", "pcgrad", "cagrad"])
def test_gradient_level_methods_train_end_to_end_and_log_their_gradients(tiny_dataset, tmp_path, monkeypatch, method):
    # tiny.yaml mixes activations with cross-stitch at enc1: enc0 and enc1 are on both tasks' paths
    data_dir, _ = tiny_dataset
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config(TINY, [f"data.root={data_dir}", f"weighting={{method: {method}}}", "tracking.log_model=false"])
    assert cfg.shared_depths == ["enc0", "enc1"]
    res = run_training(cfg, out_dir=tmp_path / "runs", progress=False)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(res.run_id)
    assert run.data.tags["medmtl.weighting"] == method and run.data.params["weighting.method"] == method
    steps = cfg.train.steps
    for key in ("gradients/norm/ct", "gradients/norm/mr", "gradients/cosine/ct_mr", "gradients/conflict_fraction",
                "gradients/coefficient/mr", "loss/ct"):
        history = client.get_metric_history(res.run_id, key)
        assert [m.step for m in history] == list(range(1, steps + 1)), key
        assert all(math.isfinite(m.value) for m in history), key
    assert all(-1.0 <= m.value <= 1.0 for m in client.get_metric_history(res.run_id, "gradients/cosine/ct_mr"))
    assert all(m.value > 0 for m in client.get_metric_history(res.run_id, "gradients/norm/mr"))
