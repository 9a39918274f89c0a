"""Study machinery without training: cells and their keys, the bootstrap, the Optuna queue, pruning, label budgets."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from medmtl.config import ConfigError
from medmtl.data.loaders import split_cases
from medmtl.data.manifest import read_manifest
from medmtl.study.cells import expand_cells
from medmtl.study.queue import CellQueue
from medmtl.study.report import bootstrap_delta_m
from medmtl.study.spec import SweepParam, load_study_spec
from medmtl.study.sweep import PruningReporter, overrides_from_params

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _spec(tmp_path: Path, **extra) -> Path:
    # a study scores cells on a test split: the tiny config has none, the study's overrides add it
    extra["overrides"] = ["data.test_fraction=0.34", *extra.get("overrides", [])]
    raw = {"name": "u", "base": str(TINY), "datasets": {"a": {"root": "/data/a"}, "b": {"root": "/data/b"}},
           "variants": {"single_task": {"sharing": []}, "hard": {"sharing": [{"kind": "hard"}]},
                        "stitch": {"sharing": [{"kind": "cross_stitch", "depths": ["enc1"]}]}},
           "weighting": {"equal": {"method": "equal"}, "gradnorm": {"method": "gradnorm", "depth": "bottleneck"}},
           "seeds": [0, 1], "budgets": {"all": {}, "mr1": {"mr": 1}}, **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_matrix_blocks_give_the_union_of_their_products(tmp_path):
    path = _spec(tmp_path, matrix=[{"weighting": ["equal"]}, {"variant": ["stitch"], "weighting": ["gradnorm"], "dataset": ["a"]}])
    cells = expand_cells(load_study_spec(path), path)
    # block 1: 2 data sets x 2 budgets x 3 variants x 2 seeds; block 2: 1 x 2 x 1 x 2, nothing in common
    assert len(cells) == 24 + 4
    assert {(c.variant, c.weighting) for c in cells if c.weighting == "gradnorm"} == {("stitch", "gradnorm")}
    c = next(c for c in cells if c.budget == "mr1")
    assert c.cfg.data.label_budget == {"mr": 1} and c.cfg.data.root == "/data/" + c.dataset
    assert c.cfg.seed == c.seed and c.cfg.weighting.method == c.weighting


def test_cell_key_is_the_resolved_config_not_the_data_path(tmp_path):
    path = _spec(tmp_path)
    keys = {c.label: c.key for c in expand_cells(load_study_spec(path), path)}
    assert len(set(keys.values())) == len(keys)  # every cell its own key
    moved = _spec(tmp_path, datasets={"a": {"root": "/elsewhere/a"}, "b": {"root": "/elsewhere/b"}})
    assert {c.label: c.key for c in expand_cells(load_study_spec(moved), moved)} == keys
    longer = _spec(tmp_path, overrides=["train.steps=5"])
    assert not set(c.key for c in expand_cells(load_study_spec(longer), longer)) & set(keys.values())


def test_identical_variants_and_unknown_names_are_refused(tmp_path):
    path = _spec(tmp_path, variants={"single_task": {"sharing": []}, "copy": {"sharing": []}})
    with pytest.raises(ConfigError, match="same config"):
        expand_cells(load_study_spec(path), path)
    with pytest.raises(ConfigError, match="matrix.0.variant: unknown name 'soft'"):
        load_study_spec(_spec(tmp_path, matrix=[{"variant": ["soft"]}]))


def test_bootstrap_delta_m_by_hand():
    # one seed, one case per task: every resample is the same, the interval is the point
    d, ci, per, _ = bootstrap_delta_m([{"ct": (np.array([0.9]), np.array([0.8])), "mr": (np.array([0.5]), np.array([0.4]))}], n=200)
    assert per == pytest.approx({"ct": 12.5, "mr": 25.0})
    assert d == pytest.approx(18.75) and ci == pytest.approx((18.75, 18.75))
    # two seeds of two cases: the point estimate pools all cases, the interval lies within the extreme resamples
    pairs = [{"ct": (np.array([0.9, 0.7]), np.array([0.8, 0.8]))}, {"ct": (np.array([0.6, 0.6]), np.array([0.5, 0.7]))}]
    d, (lo, hi), _, _ = bootstrap_delta_m(pairs, n=2000)
    assert d == pytest.approx(100 * (2.8 - 2.8) / 2.8)
    # the most extreme resamples repeat the best case pair (0.6 vs 0.5: +20%) or the worst (0.6 vs 0.7: -14.3%)
    assert -100 / 7 <= lo < 0 < hi <= 20.0


def test_queue_hands_each_cell_out_once_and_retries_a_lost_one(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    q1 = CellQueue(url, "s", heartbeat_s=1, grace_s=2)
    assert q1.enqueue({"k1": {}, "k2": {}}) == 2
    assert q1.enqueue({"k1": {}, "k2": {}}) == 0  # a re-run enqueues nothing new
    q2 = CellQueue(url, "s", heartbeat_s=1, grace_s=2)
    a, b = q1.claim(), q2.claim()
    assert {a.cell, b.cell} == {"k1", "k2"} and q1.claim() is None
    q1.finish(a, 0.5)
    # b's worker dies: no heartbeat after its claim; after the grace period any worker reaps it
    time.sleep(3.5)
    q1.reap()
    retry = q1.claim()
    assert retry is not None and retry.cell == b.cell and retry.number != b.number
    q1.finish(retry, 0.7)
    assert q1.states() == {"k1": "COMPLETE", "k2": "COMPLETE"}
    assert q1.enqueue({"k1": {}, "k2": {}}) == 0


def test_a_duplicate_trial_of_a_finished_cell_is_not_trained(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    q = CellQueue(url, "s", heartbeat_s=1, grace_s=2)
    q.enqueue({"k": {}})
    c = q.claim()
    q.finish(c, 1.0)
    q.study.enqueue_trial({}, user_attrs={"cell": "k"})  # as a racing second enqueue would
    assert q.claim() is None
    assert [t.state.name for t in q.study.get_trials()] == ["COMPLETE", "PRUNED"]


def test_pruning_reporter_stops_a_trial_below_the_median():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()

    class Ev:
        def __init__(self, v):
            self.mean_dice = {"ct": {"mean": v}, "mr": {"mean": v}}

    PruningReporter(good)(2, Ev(0.9))
    study.tell(good, 0.9)
    bad = study.ask()
    with pytest.raises(optuna.TrialPruned):
        PruningReporter(bad)(2, Ev(0.1))


def test_mixing_init_parameter_becomes_a_matrix():
    space = {"sharing.1.init": SweepParam(low=0.5, high=0.99, as_mixing=True), "weighting.alpha": SweepParam(low=0.1, high=3)}
    assert overrides_from_params({"sharing.1.init": 0.75, "weighting.alpha": 1.5}, space) == [
        "sharing.1.init=[[0.75, 0.25], [0.25, 0.75]]", "weighting.alpha=1.5"]


def test_label_budget_keeps_validation_and_test_cases(tiny_dataset):
    data_dir, _ = tiny_dataset
    real = read_manifest(data_dir)
    # ten MR cases (copies of one entry under other case ids) and the real CT ones
    mr = next(e for e in real if e.modality == "MR")
    entries = [e for e in real if e.modality == "CT"] + [replace(mr, case_id=f"case-{i:012d}") for i in range(10)]
    full = split_cases(entries, val_fraction=0.2, test_fraction=0.3, seed=0)
    scarce = split_cases(entries, val_fraction=0.2, test_fraction=0.3, seed=0, label_budget={"mr": 2})
    assert scarce.val == full.val and scarce.test == full.test and scarce.train["ct"] == full.train["ct"]
    assert len(full.train["mr"]) == 5
    assert len(scarce.train["mr"]) == 2 and set(scarce.train["mr"]) < set(full.train["mr"])
    # reproducible for a seed, so every cell of a study with this budget trains on the same two cases
    assert split_cases(entries, val_fraction=0.2, test_fraction=0.3, seed=0, label_budget={"mr": 2}).train == scarce.train


def test_a_study_without_a_test_split_is_refused(tmp_path):
    """The scores of a cell are its test Dice: without a test split they would be the validation Dice that chose best.pt."""
    path = _spec(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["overrides"] = []
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="data.test_fraction"):
        expand_cells(load_study_spec(path), path)
