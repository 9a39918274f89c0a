"""`medmtl evaluate` and `medmtl compare` on two real tiny runs (multi-task and single-task)."""

import json

import pytest
from mlflow.tracking import MlflowClient

from medmtl.config import load_config
from pipelines.compare import run_compare, run_metrics
from pipelines.evaluate import run_evaluation
from pipelines.train import run_training

pytestmark = pytest.mark.slow


def test_evaluate_logs_dice_hd95_overlays_and_compare_reproduces_delta_m(tiny_dataset, tmp_path, monkeypatch):
    from pathlib import Path

    data_dir, _ = tiny_dataset
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    split = [f"data.root={data_dir}", "data.val_fraction=0.34", "data.test_fraction=0.34"]  # `evaluate` scores the test cases
    mtl = run_training(load_config(tiny, split), out_dir=tmp_path / "runs", progress=False)
    stl = run_training(load_config(tiny, split + ["sharing=[]", "weighting={method: equal}"]), out_dir=tmp_path / "runs", progress=False)
    ev = run_evaluation(mtl.run_id, overlays=1)
    run_evaluation(stl.run_id, overlays=0)
    client = MlflowClient(tracking_uri=uri)
    m = client.get_run(mtl.run_id).data.metrics
    for key in ("eval/dice/ct/liver", "eval/hd95/mr/spleen", "eval/dice/mr/mean", "eval/hd95/ct/mean"):
        assert key in m
    assert m["eval/dice/ct/mean"] == pytest.approx(ev.dice["ct"]["mean"])
    # held-out Dice from `evaluate` equals the trainer's final test Dice (same model, same cases, same grid)
    assert m["eval/dice/ct/mean"] == pytest.approx(m["test/dice/ct/mean"], abs=1e-6)
    artifacts = [a.path for a in client.list_artifacts(mtl.run_id, "overlays")]
    assert artifacts and all(p.endswith(".png") for p in artifacts)

    d = run_compare([mtl.run_id], [stl.run_id])
    a, b = run_metrics(client, mtl.run_id), run_metrics(client, stl.run_id)
    hand = {}
    for t in ("ct", "mr"):
        dice = (a[t]["dice"] - b[t]["dice"]) / b[t]["dice"] * 100
        hd = -(a[t]["hd95"] - b[t]["hd95"]) / b[t]["hd95"] * 100
        hand[t] = (dice + hd) / 2
    assert d.per_task == pytest.approx(hand)
    assert d.value == pytest.approx((hand["ct"] + hand["mr"]) / 2)
    assert client.get_run(mtl.run_id).data.metrics["compare/delta_m"] == pytest.approx(d.value)
    local = client.download_artifacts(mtl.run_id, "compare/delta_m.json", str(tmp_path))
    table = json.loads(open(local).read())
    assert table["negative_transfer"] == [t for t in ("ct", "mr") if hand[t] < 0]
