"""A mixture-of-LoRA run end to end: routing statistics reach MLflow, and the logged (unmerged, routed)
model reloads from its config and segments."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from medmtl.config import load_config
from medmtl.sharing.lora_layers import LoRAConv
from medmtl.tracking.store import using_tracking_uri
from pipelines.train import run_training
from tracking_helpers import TINY_CONFIG

pytestmark = pytest.mark.slow


def test_mixture_run_logs_routing_statistics_and_its_model_serves(tiny_dataset, empty_db, tmp_path):
    data_dir, _ = tiny_dataset
    shutil.copyfile(empty_db, tmp_path / "mlflow.db")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(TINY_CONFIG, [f"data.root={data_dir}", f"tracking.tracking_uri={store}", "tracking.overlay_cases=0",
                                    "tracking.system_metrics=false", "train.steps=2", "train.val_every=2",
                                    "sharing=[{kind: mixture_of_lora, depths: [bottleneck, dec1], num_experts: 3, top_k: 2, rank: 2}]"])
    res = run_training(cfg, out_dir=tmp_path / "runs", progress=False)
    metrics = MlflowClient(tracking_uri=store).get_run(res.run_id).data.metrics
    for depth in ("bottleneck", "dec1"):
        for m in ("ct", "mr"):
            usage = [metrics[f"mixture_of_lora/{depth}/{m}/usage/e{e}"] for e in range(3)]
            assert sum(usage) == pytest.approx(1.0)
            assert f"mixture_of_lora/{depth}/{m}/entropy" in metrics and f"mixture_of_lora/{depth}/{m}/balance_loss" in metrics
    with using_tracking_uri(store):
        model = mlflow.pyfunc.load_model(res.model_uri)
    inner = model.unwrap_python_model()
    assert inner.cfg.sharing[0].kind == "mixture_of_lora"  # routed per input: deployed with its router, not merged
    assert any(isinstance(m, LoRAConv) for m in inner.segmenter.net.modules())
    vol = np.random.default_rng(0).normal(0, 1, size=(20, 22, 9)).round(2)
    out = model.predict(pd.DataFrame([{"array": vol.tolist(), "affine": np.diag([8.0, 8.0, 8.0, 1.0]).tolist(), "modality": "MR"}]))
    assert np.asarray(out.loc[0, "labels"]).shape == (20, 22, 9)
