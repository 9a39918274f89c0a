"""Stored-loss regression test (in the style of torchtune's): a tiny config trained for 20 steps on CPU
with one thread and a fixed seed must reproduce the committed loss trajectory.

It pins *training* (data stream, transforms, net, sharing, weighting, step) against silent change: a
refactor that moves code must leave these numbers as they are. A change that is meant to alter training
regenerates the file on purpose: ``MEDMTL_UPDATE_STORED_LOSSES=1 pytest tests/training/test_stored_losses.py``,
and says why in its commit.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from medmtl.config import load_config
from medmtl.ingest.run import ingest
from medmtl.ingest.pseudonym import SECRET_FILE_NAME
from medmtl.synth import synthesize_exports
from medmtl.data.loaders import load_split
from medmtl.data.plan import compute_plan, resolve_plan
from medmtl.tracking.logger import NullLogger
from medmtl.training.trainer import Trainer

HERE = Path(__file__).resolve().parent
TINY = HERE.parent / "configs" / "tiny.yaml"
STORED = HERE / "stored_losses.json"
STEPS = 20
# float32 CPU kernels with one thread are deterministic on one machine; the tolerance allows for another
# CPU's vector width changing the summation order, far below what any change of behaviour moves
RTOL, ATOL = 1e-4, 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pinned_dataset(tmp_path_factory):
    """The tiny dataset ingested with a fixed pseudonym secret: case ids, and so the split, are the same every run."""
    root = tmp_path_factory.mktemp("stored_losses")
    synth = synthesize_exports(root / "synth", n_ct=3, n_mr=3, seed=11, ct_matrix=64, mr_matrix=56)
    (root / "data").mkdir()
    secret = root / "data" / SECRET_FILE_NAME
    secret.write_text("5" * 64 + "\n")
    secret.chmod(0o600)
    ingest(synth.export_dir, root / "data", labels_dir=synth.labels_dir, progress=False)
    return root / "data"


def _trajectory(data_dir: Path, out: Path) -> dict[str, list[float]]:
    cfg = load_config(TINY, [f"data.root={data_dir}", f"train.steps={STEPS}", "train.log_every=1", "train.val_every=1000",
                             f"train.checkpoint_every={STEPS}", "data.num_workers=0"])
    _, split = load_split(cfg)
    plan = resolve_plan(compute_plan(data_dir, cfg), cfg)
    trainer = Trainer(cfg=cfg, plan=plan, split=split, data_dir=data_dir, logger=NullLogger(), out_dir=out, progress=False)
    summary = trainer.train()
    keys = sorted(k for k in summary.history[0] if k.startswith(("loss/", "penalty/", "gradnorm/weight")))
    return {k: [row[k] for row in summary.history] for k in keys}


def test_training_reproduces_the_stored_loss_trajectory(pinned_dataset, tmp_path, one_thread):
    got = _trajectory(pinned_dataset, tmp_path)
    if os.environ.get("MEDMTL_UPDATE_STORED_LOSSES") == "1":
        STORED.write_text(json.dumps({"steps": STEPS, "trajectory": got}, indent=1) + "\n")
        pytest.skip(f"wrote {STORED}")
    stored = json.loads(STORED.read_text())["trajectory"]
    assert set(stored) <= set(got), f"quantities no longer logged: {sorted(set(stored) - set(got))}"
    for key, values in stored.items():
        assert len(got[key]) == len(values) == STEPS, key
        assert got[key] == pytest.approx(values, rel=RTOL, abs=ATOL), key
