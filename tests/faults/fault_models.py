"""A small logged and registered model for the fault tests, in a store of the test's own.

Imported by the test modules (``from fault_models import make_model``; this folder is on ``sys.path`` under
pytest's default import mode), so that the fault suite does not depend on another folder's conftest. The
model is the tiny test architecture with seeded, untrained weights: the faults tested here (inputs,
URIs, tampered files) do not depend on what the weights learned, and its segmentations of the synthetic
images are not empty, so an all-background answer is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "tests" / "configs" / "tiny.yaml"
MODEL_NAME = "medmtl-faults"


@dataclass
class FaultModel:
    """A registered model: tracking URI, registered name, logged model URI, the store folder, data and config."""

    uri: str
    name: str
    logged_uri: str
    root: Path
    data_dir: Path
    cfg: object

    def artifact_dir(self) -> Path:
        """Local folder of the logged model's files in the artifact store (what an attacker could write)."""
        from mlflow.tracking import MlflowClient

        lm = MlflowClient(tracking_uri=self.uri).get_logged_model(self.logged_uri.removeprefix("models:/"))
        return Path(lm.artifact_location.removeprefix("file://"))


def build_model(root: Path, data_dir: Path, *, register: bool = True) -> FaultModel:
    """Log the seeded tiny model into a new SQLite store under ``root`` and register it (alias challenger)."""
    import torch
    from mlflow.tracking import MlflowClient

    from medmtl.config import config_to_yaml, load_config
    from medmtl.data.plan import compute_plan, resolve_plan
    from medmtl.inference.pyfunc_model import log_segmentation_model
    from medmtl.models.two_column import TwoColumnNet
    from medmtl.tracking.registry import register_run_model
    from medmtl.tracking.store import ensure_experiment

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(TINY_CONFIG, [f"data.root={data_dir}"])
    plan = resolve_plan(compute_plan(data_dir, cfg), cfg)
    torch.manual_seed(0)
    net = TwoColumnNet(cfg=cfg)
    exp = ensure_experiment("medmtl-faults", uri, (root / "artifacts").as_uri())
    run_id = MlflowClient(tracking_uri=uri).create_run(exp).info.run_id
    names = list(dict.fromkeys([*cfg.data.labels["ct"].values(), *cfg.data.labels["mr"].values()]))
    logged = log_segmentation_model(run_id=run_id, tracking_uri=uri, net=net, cfg_yaml=config_to_yaml(cfg), plan=plan.to_dict(),
                                    class_names=names)
    if register:
        register_run_model(tracking_uri=uri, run_id=run_id, name=MODEL_NAME, model_uri=logged)
    return FaultModel(uri=uri, name=MODEL_NAME, logged_uri=logged, root=root, data_dir=data_dir, cfg=cfg)


@pytest.fixture(scope="session")
def shared_model(tiny_dataset, tmp_path_factory) -> FaultModel:
    """One registered model for the tests that only read it (never tamper with this one)."""
    return build_model(tmp_path_factory.mktemp("fault_model"), tiny_dataset[0])


@pytest.fixture
def own_model(tiny_dataset, tmp_path) -> FaultModel:
    """A registered model of this test's own, whose artifact files the test may change."""
    return build_model(tmp_path / "model", tiny_dataset[0])


@pytest.fixture(autouse=True)
def _clean_mlflow_uri(monkeypatch):
    """In-process `medmtl predict` sets MLflow's process-wide URI: give every test a clean one afterwards."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old = tracking_utils._tracking_uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(old)
