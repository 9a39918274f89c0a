"""Shared fixtures: one small ingested dataset per test session (synthetic exports with fake PHI)."""

from pathlib import Path

import pytest

from medmtl.ingest.run import ingest
from medmtl.synth import synthesize_exports

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "tests" / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """``(data_dir, synth_result)``: 3 CT and 3 MR patients, small matrices, ingested with labels."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    synth = synthesize_exports(root / "synth", n_ct=3, n_mr=3, seed=11, ct_matrix=64, mr_matrix=56)
    ingest(synth.export_dir, root / "data", labels_dir=synth.labels_dir, progress=False)
    return root / "data", synth
