"""The training pipeline with a separate test split: final scores and the evaluation-set tag come from it."""

import json
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
