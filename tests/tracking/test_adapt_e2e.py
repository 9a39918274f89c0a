"""`medmtl adapt`: a LoRA-trained model (logged merged) adapted to MR with only MR adapters training; the
registered version is merged, keeps CT exactly, matches its unmerged checkpoint, and predict and serve use it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
import yaml
from mlflow.tracking import MlflowClient

from medmtl.cli import main as medmtl
from medmtl.config import load_config, validate_config
from medmtl.data.manifest import read_manifest
from medmtl.models.two_column import TwoColumnNet
from medmtl.sharing.lora_layers import LoRAConv
from medmtl.tracking.store import using_tracking_uri
from pipelines.train import run_training
from tracking_helpers import MODEL_NAME, TINY_CONFIG, clean_env, free_port, wait_http

pytestmark = pytest.mark.slow


def _load(uri: str, store: str):
    with using_tracking_uri(store):
        return mlflow.pyfunc.load_model(uri).unwrap_python_model()


def test_adapt_trains_only_mr_adapters_and_registers_a_merged_model(tiny_dataset, empty_db, tmp_path, monkeypatch, capsys):
    data_dir, _ = tiny_dataset
    (tmp_path / "db").mkdir()
    import shutil

    shutil.copyfile(empty_db, tmp_path / "db" / "mlflow.db")
    store = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    cfg = load_config(TINY_CONFIG, [f"data.root={data_dir}", f"tracking.tracking_uri={store}", "tracking.overlay_cases=0",
                                    "tracking.system_metrics=false", "sharing=[{kind: lora, rank: 2}]"])
    source = run_training(cfg, out_dir=tmp_path / "runs", progress=False)
    # a LoRA training run logs its model merged: a plain two-column net
    src_model = _load(source.model_uri, store)
    assert src_model.cfg.sharing == [] and not any(isinstance(m, LoRAConv) for m in src_model.segmenter.net.modules())

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert medmtl(["adapt", source.run_id, "train.steps=3", "train.val_every=3", "--rank", "2", "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    run_id = re.search(r"run id: (\w+)", out).group(1)
    registered = re.search(r"registered (models:/\S+)", out).group(1)

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["medmtl.adapted_from"] == source.run_id
    assert run.data.tags["medmtl.sharing"] == "lora"
    share = run.data.metrics["params/trainable_fraction"]
    assert 0 < share < 0.2 and run.data.metrics["params/trainable"] > 0
    assert 0 < run.data.metrics["params/trainable_fraction_of_two_columns"] < share  # one shared column, not two

    adapted = _load(registered, store)
    assert adapted.cfg.sharing == [] and not any(isinstance(m, LoRAConv) for m in adapted.segmenter.net.modules())
    x = torch.randn(1, 1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    net_src, net_ad = src_model.segmenter.net.eval(), adapted.segmenter.net.eval()
    with torch.no_grad():
        # CT has no delta and a frozen base: exactly the source's CT column and head
        assert torch.equal(net_ad(x, "ct"), net_src(x, "ct"))
        # MR started from the CT model and moved through its adapters only
        assert not torch.allclose(net_ad(x, "mr"), net_src(x, "ct"))

        # merged (registered) and unmerged (the run's last checkpoint) agree within fp32 tolerance
        raw = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text())
        unmerged = TwoColumnNet(cfg=validate_config(raw))
        unmerged.load_state_dict(torch.load(tmp_path / "runs" / run_id / "last.pt", weights_only=True)["net"])
        unmerged.eval()
        assert any(isinstance(m, LoRAConv) for m in unmerged.modules())
        for m in ("ct", "mr"):
            torch.testing.assert_close(net_ad(x, m), unmerged(x, m), rtol=1e-5, atol=1e-5)

    # `medmtl predict` uses the adapted model unchanged
    mr_image = data_dir / next(e.image for e in read_manifest(data_dir) if e.modality == "MR")
    pred = tmp_path / "pred.nii.gz"
    assert medmtl(["predict", registered, str(mr_image), "--modality", "MR", "--out", str(pred)]) == 0 and pred.exists()

    # and so does `mlflow models serve`
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", registered, "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=clean_env(MLFLOW_TRACKING_URI=store), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc)
        vol = np.random.default_rng(1).normal(300, 80, size=(19, 27, 11)).round(1)
        body = {"dataframe_records": [{"array": vol.tolist(), "affine": np.diag([7.0, 7.0, 8.0, 1.0]).tolist(), "modality": "MR"}]}
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert r.status_code == 200, r.text[:2000]
        served = np.asarray(r.json()["predictions"][0]["labels"])
        local = adapted.predict(None, pd.DataFrame(body["dataframe_records"]))
        assert np.array_equal(served, np.asarray(local.loc[0, "labels"]))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert MODEL_NAME in registered

    # a checkpoint of the (LoRA-trained) source run is a source too: its run's config and plan come along
    ckpt = tmp_path / "runs" / source.run_id / "last.pt"
    assert medmtl(["adapt", str(ckpt), "train.steps=1", "train.val_every=1", "--rank", "1", "--no-register",
                   "--out", str(tmp_path / "runs")]) == 0
    again = re.search(r"run id: (\w+)", capsys.readouterr().out).group(1)
    assert client.get_run(again).data.tags["medmtl.adapted_from"] == str(ckpt)


def test_adapt_refuses_a_source_it_cannot_use(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert medmtl(["adapt", "no-such-run", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("medmtl adapt: error:")]
    assert "Traceback" not in err and len(ours) == 1 and "no-such-run" in ours[0]
