"""Faults around a training run leave no debris and say what happened in one line (issue 12, item 5).

Old failures: an unwritable ``--out`` left an MLflow run RUNNING forever with no params; disk full while
checkpointing ended in ``RuntimeError: [enforce fail at inline_container.cc:672]`` and a misleading "MLflow
server not answering"; a truncated checkpoint given to ``--resume`` was a traceback; ``medmtl train CONFIG
--out DIR key=value`` failed with "unrecognized arguments".
"""

from __future__ import annotations

import errno

import pytest
import torch
from mlflow.tracking import MlflowClient

from fault_helpers import ROOT, assert_one_line_error, run_medmtl

TINY = ROOT / "tests" / "configs" / "tiny.yaml"


@pytest.fixture
def store(tmp_path):
    from medmtl.tracking.store import embedded_store, prepare_store

    uri, _ = embedded_store(tmp_path / "store")
    prepare_store(uri)
    return uri


def _runs(uri):
    client = MlflowClient(tracking_uri=uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_unwritable_out_is_refused_before_the_run(tiny_dataset, tmp_path, store):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "runs"  # a folder below a file: not creatable, also for root
    res = run_medmtl(["train", str(TINY), f"data.root={tiny_dataset[0]}", "--out", str(out)], cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": store})
    assert str(out) in assert_one_line_error(res, "train")
    assert _runs(store) == []


def test_failure_after_the_run_exists_ends_it_failed(tiny_dataset, tmp_path, store, monkeypatch):
    """The spool (inside --out) cannot be created once the run exists: the run ends FAILED, not RUNNING."""
    import medmtl.tracking.logger as logger_mod
    from medmtl.config import load_config
    from pipelines.train import run_training

    class Broken(logger_mod.Spool):
        def __init__(self, *a, **k):
            raise PermissionError(13, "Permission denied", str(tmp_path / "runs"))

    monkeypatch.setattr(logger_mod, "Spool", Broken)
    cfg = load_config(TINY, [f"data.root={tiny_dataset[0]}", f"tracking.tracking_uri={store}", "train.steps=2"])
    with pytest.raises(PermissionError):
        run_training(cfg, out_dir=tmp_path / "runs", progress=False)
    assert [r.info.status for r in _runs(store)] == ["FAILED"]


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tiny_dataset, tmp_path, store, monkeypatch):
    import medmtl.training.checkpoint as ckpt_mod
    from medmtl.config import load_config
    from medmtl.training.checkpoint import NoSpaceLeft
    from pipelines.train import run_training

    real = ckpt_mod._write_file
    writes = {"n": 0}

    def fill_disk(path, data):
        """The second last.pt write fills the disk half-way (ENOSPC, as a full file system answers)."""
        if ".tmp-last.pt" in path.name:
            writes["n"] += 1
            if writes["n"] == 2:
                with open(path, "wb") as fh:
                    fh.write(bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_file", fill_disk)
    cfg = load_config(TINY, [f"data.root={tiny_dataset[0]}", f"tracking.tracking_uri={store}", "train.steps=4",
                             "train.checkpoint_every=2", "train.val_every=100", "tracking.log_model=false"])
    with pytest.raises(NoSpaceLeft) as info:
        run_training(cfg, out_dir=tmp_path / "runs", progress=False)
    (run,) = _runs(store)
    last = tmp_path / "runs" / run.info.run_id / "last.pt"
    assert str(info.value) == f"no space left on device writing {last}; last good checkpoint: step 2 ({last})"
    assert "\n" not in str(info.value)
    assert torch.load(last, weights_only=True)["step"] == 2, "the previous checkpoint stays intact"
    assert not list(last.parent.glob(".tmp-*")), "no temporary file left behind"
    assert run.info.status == "FAILED"


def test_truncated_checkpoint_to_resume_is_one_line(tiny_dataset, tmp_path, store):
    ckpt = tmp_path / "last.pt"
    torch.save({"step": 3, "net": {"w": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    res = run_medmtl(["train", str(TINY), f"data.root={tiny_dataset[0]}", "--resume", str(ckpt)], cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": store})
    line = assert_one_line_error(res, "train")
    assert str(ckpt) in line and "truncated" in line
    assert _runs(store) == []


def test_overrides_anywhere_on_the_line():
    from medmtl.cli import parse_args

    args = parse_args(["train", str(TINY), "--out", "runs", "train.steps=3", "--resume", "x/last.pt", "seed=2"])
    assert (args.overrides, args.out, args.resume) == (["train.steps=3", "seed=2"], "runs", "x/last.pt")
    args = parse_args(["train", str(TINY), "train.steps=3", "--out", "runs", "seed=2"])
    assert args.overrides == ["train.steps=3", "seed=2"]
    with pytest.raises(SystemExit):
        parse_args(["train", str(TINY), "--out", "runs", "--no-such-flag"])
