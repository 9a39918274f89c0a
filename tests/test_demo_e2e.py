"""The thin path through the real command line: synth -> ingest -> train -> evaluate -> MLflow -> registry.

Runs ``medmtl demo`` on the tiny config in a temporary working directory (so the embedded store is
created under its ``mlflow/``), then checks what a user relies on: the run and its metrics in MLflow,
the registered version behind alias ``challenger``, a model that loads and predicts on the input grid,
and that no fake patient data reached the dataset, the MLflow store or the terminal.
"""

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from medmtl.synth import synthesize_exports
from medmtl.procenv import interpreter_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    wd = tmp_path_factory.mktemp("demo")
    synth = synthesize_exports(wd / "work" / "synth", n_ct=3, n_mr=3, seed=5, ct_matrix=64, mr_matrix=56)
    env = interpreter_env({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    proc = subprocess.run(
        [sys.executable, "-m", "medmtl.cli", "demo", str(ROOT / "tests" / "configs" / "tiny.yaml"), "--workdir", "work", "--ct", "3", "--mr", "3", "--seed", "5"],
        cwd=wd, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return wd, synth, proc


def test_demo_prints_run_model_and_ui_command(demo):
    wd, _, proc = demo
    out = proc.stdout
    assert re.search(r"run id:\s+[0-9a-f]{32}", out)
    assert "registered model: medmtl-tiny version 1 (alias challenger)" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{wd / 'mlflow' / 'mlflow.db'}" in out
    # the tiny config has no test split: the scores say what they are, and links open the model-training view
    assert "validation Dice (no test set) of best.pt" in out and "liver" in out
    assert re.search(r"run page:\s+http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}\?workflowType=machine_learning", out)
    assert "model version:  http://127.0.0.1:5000/#/models/medmtl-tiny/versions/1?workflowType=machine_learning" in out


def test_run_holds_params_metrics_artifacts_and_a_registered_version(demo):
    wd, _, proc = demo
    run_id = re.search(r"run id:\s+([0-9a-f]{32})", proc.stdout).group(1)
    client = MlflowClient(tracking_uri=f"sqlite:///{wd / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "4" and run.data.params["sharing.1.kind"] == "cross_stitch"
    for key in ("loss/ct", "loss/mr", "weight/ct", "gradnorm/G/mr", "penalty/soft/enc0", "cross_stitch/enc1/ct_mr",
                "val/dice/ct/liver", "val/dice/mr/kidney_right", "val/dice/ct/mean", "val/loss/ct"):
        assert key in run.data.metrics, key
    assert not [k for k in run.data.metrics if k.startswith("test/")]  # no test split, no test metric
    losses = client.get_metric_history(run_id, "loss/ct")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert all(np.isfinite(m.value) and m.value > 0 for m in losses)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "plan.json", "ingest_summary.json", "evaluation"} <= names
    assert run.data.tags["medmtl.sharing"] == "soft+cross_stitch"
    mv = client.get_model_version_by_alias("medmtl-tiny", "challenger")
    assert str(mv.version) == "1" and mv.run_id == run_id


def test_registered_model_loads_by_alias_and_predicts_on_the_input_grid(demo, tmp_path):
    import mlflow

    wd, _, _ = demo
    mlflow.set_tracking_uri(f"sqlite:///{wd / 'mlflow' / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/medmtl-tiny@challenger")
    manifest = pd.read_json(wd / "work" / "data" / "manifest.jsonl", lines=True)
    row = manifest[manifest.modality == "MR"].iloc[0]
    image = wd / "work" / "data" / row.image
    out = tmp_path / "pred.nii.gz"
    res = model.predict(pd.DataFrame([{"image": str(image), "modality": "MR", "output": str(out)}]))
    assert res.loc[0, "output"] == str(out)
    src, pred = nib.load(str(image)), nib.load(str(out))
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3, 4}


def _all_bytes(root: Path):
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith(".gz"):
                data = gzip.decompress(data)
            yield p, data


def test_no_fake_phi_in_dataset_mlflow_store_or_terminal(demo):
    wd, synth, proc = demo
    secrets = set(synth.phi_strings()) | set(synth.uid_strings())
    assert len(secrets) > 20
    needles = [s.encode() for s in secrets]
    checked = 0
    for root in (wd / "work" / "data", wd / "mlflow"):
        for path, data in _all_bytes(root):
            if path.name == ".medmtl_secret":
                continue
            checked += 1
            for s in needles:
                assert s not in data, f"{s!r} leaked into {path.relative_to(wd)}"
    assert checked > 10
    for s in secrets:
        assert s not in proc.stdout and s not in proc.stderr
    # and the export itself carries them (so the check above means something)
    sample = next(p for p in (wd / "work" / "synth" / "export").rglob("*") if p.is_file())
    assert any(s in sample.read_bytes() for s in needles)
