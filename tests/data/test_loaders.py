"""Unpaired batches: reproducible for a seed, identical with 0 or 2 workers, exact across a resume (patches and
augmentation), no early epoch end for the smaller modality, a configurable CT:MR ratio, disjoint DDP shards."""

import itertools

import pytest
import torch

from medmtl.config import load_config
from medmtl.data.loaders import EndlessSampler, Split, build_training_stream, split_cases
from medmtl.errors import DataError
from medmtl.data.manifest import read_manifest
from medmtl.data.plan import compute_plan

OVERRIDES = ["preprocess.patch_size=[16, 16, 8]", "model.channels=[4, 8]", "train.batch_size.ct=2", "train.batch_size.mr=1",
             "preprocess.albumentations.enabled=true"]


@pytest.fixture(scope="module")
def setup(tiny_dataset):
    data_dir, _ = tiny_dataset
    cfg = load_config(None, OVERRIDES)
    plan = compute_plan(data_dir, cfg)
    entries = read_manifest(data_dir)
    return data_dir, cfg, plan, split_cases(entries, val_fraction=0.34, seed=0), entries


def _stream(setup, *extra, **kw):
    data_dir, _, plan, split, _ = setup
    return build_training_stream(load_config(None, OVERRIDES + list(extra)), plan, kw.pop("split", split), data_dir=data_dir, device=None, **kw)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _same(a, b) -> bool:
    return all(torch.equal(x[m][k], y[m][k]) for x, y in zip(a, b) for m in ("ct", "mr") for k in ("image", "label"))


def test_same_seed_same_batches_other_seed_other_batches(setup):
    a, b, c = _take(_stream(setup), 4), _take(_stream(setup), 4), _take(_stream(setup, "seed=1"), 4)
    assert _same(a, b) and not _same(a, c)


def test_resume_continues_with_exactly_the_batches_of_an_uninterrupted_run(setup):
    ref = _take(_stream(setup), 6)
    first = _stream(setup)
    _take(first, 3)
    state = first.state_dict()
    assert state == {"ct": {"drawn": 6}, "mr": {"drawn": 3}}
    resumed = _stream(setup)
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 3), ref[3:])  # patches and augmentation


def test_workers_do_not_change_the_batches_nor_the_resume_point(setup):
    ref = _take(_stream(setup), 5)
    with_workers = _stream(setup, "data.num_workers=2")
    got = _take(with_workers, 3)
    state = with_workers.state_dict()  # workers have prefetched further; the state counts what was used
    assert _same(got, ref[:3]) and state == {"ct": {"drawn": 6}, "mr": {"drawn": 3}}
    resumed = _stream(setup, "data.num_workers=2")
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 2), ref[3:])


def test_smaller_modality_cycles_without_ending_the_epoch_and_ratio_is_configurable(setup):
    data_dir, cfg, plan, _, entries = setup
    labelled = {m: [e for e in entries if e.modality == m.upper() and e.label is not None] for m in ("ct", "mr")}
    split = Split(train={"ct": labelled["ct"], "mr": labelled["mr"][:2]}, val={"ct": [], "mr": []})  # 3 CT, 2 MR
    stream = _stream(setup, "train.batch_size.ct=3", "train.batch_size.mr=1", split=split)
    seen = {"ct": [], "mr": []}
    for batch in _take(stream, 8):
        assert batch["ct"]["image"].shape[0] == 3 and batch["mr"]["image"].shape[0] == 1  # 3:1
        for m in ("ct", "mr"):
            seen[m] += list(batch[m]["case_id"])
    assert stream.state_dict() == {"ct": {"drawn": 24}, "mr": {"drawn": 8}}
    for m, n in (("ct", 3), ("mr", 2)):
        cases = {e.case_id for e in split.train[m]}
        passes = [seen[m][i:i + n] for i in range(0, len(seen[m]), n)]
        assert all(set(p) == cases for p in passes)  # every pass is a permutation of all cases


def test_ranks_take_disjoint_interleaved_shards():
    n = 7
    samplers = [EndlessSampler(n, seed=3, rank=r, world_size=2) for r in range(2)]
    draws = [list(itertools.islice(iter(s), n)) for s in samplers]
    positions = sorted(p for d in draws for _, p in d)
    assert positions == list(range(2 * n))
    single = list(itertools.islice(iter(EndlessSampler(n, seed=3)), 2 * n))
    merged = sorted((p, i) for d in draws for i, p in d)
    assert [i for _, i in merged] == [i for i, _ in single]  # the ranks split one global order


def test_sampler_resumes_at_its_start_position():
    s = EndlessSampler(5, seed=0)
    ref = list(itertools.islice(iter(s), 12))
    s.start = 7
    assert list(itertools.islice(iter(s), 5)) == ref[7:12]


def test_test_split_is_disjoint_reproducible_and_takes_the_final_scores(tiny_dataset):
    data_dir, _ = tiny_dataset
    entries = read_manifest(data_dir)
    a = split_cases(entries, val_fraction=0.34, test_fraction=0.34, seed=3)
    b = split_cases(entries, val_fraction=0.34, test_fraction=0.34, seed=3)
    for m in ("ct", "mr"):
        tr, va, te = ({e.case_id for e in part[m]} for part in (a.train, a.val, a.test))
        assert tr and va and te and not (tr & va) and not (tr & te) and not (va & te)
        assert [e.case_id for e in a.test[m]] == [e.case_id for e in b.test[m]]
    assert a.evaluation is a.test
    without = split_cases(entries, val_fraction=0.34, seed=3)
    assert without.evaluation is without.val and not any(without.test.values())
    with pytest.raises(DataError, match="data.test_fraction=0"):
        split_cases([e for e in entries if e.modality == "MR"][:2] + [e for e in entries if e.modality == "CT"],
                    val_fraction=0.34, test_fraction=0.34, seed=3)
