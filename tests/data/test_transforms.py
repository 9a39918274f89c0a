"""Transform chains: the documented intensity statistics per modality, patches centred on foreground at the
configured rate, the cache really used (deterministic transforms never run again) and left intact, and the
device path (``ToDeviced`` after the cached part), exercised on the CPU."""

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, MetaTensor, ThreadDataLoader
from monai.transforms import Compose, LoadImaged, RandomizableTrait, Spacingd, ToDeviced

from medmtl.config import load_config
from medmtl.data.loaders import SeededSamples, build_training_stream, split_cases, training_dataset
from medmtl.data.manifest import read_manifest
from medmtl.data.plan import body_mask, compute_plan
from medmtl.data.transforms import (
    CLASS_INDICES_KEY, ForegroundZScored, cached_training_transforms, deterministic_transforms, random_transforms,
)

OVERRIDES = ["preprocess.fg_samples_per_image=1000000000", "preprocess.patch_size=[32, 32, 16]", "train.batch_size.ct=2",
             "train.batch_size.mr=2"]


@pytest.fixture(scope="module")
def setup(tiny_dataset):
    data_dir, _ = tiny_dataset
    cfg = load_config(None, OVERRIDES)
    plan = compute_plan(data_dir, cfg)
    entries = read_manifest(data_dir)
    return data_dir, cfg, plan, entries


def _item(data_dir, e) -> dict:
    return {"image": str(data_dir / e.image), "label": str(data_dir / e.label)}


def test_ct_chain_clips_to_the_window_and_standardizes_with_dataset_statistics(setup):
    data_dir, cfg, plan, entries = setup
    chain = Compose(deterministic_transforms(cfg, plan, "ct"))
    it = plan.ct.intensity
    lo, hi = (it["p00_5"] - it["mean"]) / it["std"], (it["p99_5"] - it["mean"]) / it["std"]
    fg = []
    for e in (e for e in entries if e.modality == "CT"):
        d = chain(_item(data_dir, e))
        img = d["image"].as_tensor()
        assert img.dtype == torch.float32 and img.min() >= lo - 1e-5 and img.max() <= hi + 1e-5  # clipped
        fg.append(img[d["label"].as_tensor() > 0])
    fg = torch.cat(fg)
    # exactly 0 and 1 on the original grids (the plan's statistics); resampling smooths a little
    assert abs(float(fg.mean())) < 0.1 and abs(float(fg.std()) - 1.0) < 0.1


def test_mr_chain_gives_each_image_mean_0_std_1_over_its_body(setup):
    data_dir, cfg, plan, entries = setup
    full = deterministic_transforms(cfg, plan, "mr")
    k = next(i for i, t in enumerate(full) if isinstance(t, ForegroundZScored))
    before, after = Compose(full[:k]), Compose(full)
    for e in (e for e in entries if e.modality == "MR"):
        raw, out = before(_item(data_dir, e))["image"], after(_item(data_dir, e))["image"]
        body = body_mask(raw.as_tensor(), "mr")
        vals = out.as_tensor()[body]
        assert float(vals.mean()) == pytest.approx(0.0, abs=1e-4) and float(vals.std()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("pos_fraction", [0.0, 0.67, 1.0])
def test_patches_are_centred_on_foreground_at_the_configured_rate(setup, pos_fraction):
    data_dir, _, plan, entries = setup
    # 8^3 patches: their centre voxel is the sampled centre (no shift away from the border)
    cfg = load_config(None, OVERRIDES + ["preprocess.patch_size=[8, 8, 8]", "preprocess.augment=false",
                                         f"preprocess.pos_fraction={pos_fraction}"])
    ct = [e for e in entries if e.modality == "CT"]
    ds = SeededSamples(training_dataset(cfg, plan, ct, data_dir=data_dir, modality="ct"), seed=0)
    n = 400
    centres = np.array([int(ds[(k % len(ct), k)][0]["label"][0, 4, 4, 4]) for k in range(n)])
    rate = float((centres > 0).mean())
    assert abs(rate - pos_fraction) <= 4 * np.sqrt(max(pos_fraction * (1 - pos_fraction), 0.01) / n)
    if pos_fraction == 1.0:  # foreground classes equally likely (1/4 each)
        counts = np.bincount(centres, minlength=5)[1:] / n
        assert np.all(np.abs(counts - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n))


def test_cache_is_really_used_and_deterministic_transforms_never_run_again(setup, monkeypatch):
    data_dir, cfg, plan, entries = setup
    calls = {"load": 0, "spacing": 0}
    load_call, spacing_call = LoadImaged.__call__, Spacingd.__call__

    def counting_load(self, *a, **k):
        calls["load"] += 1
        return load_call(self, *a, **k)

    def counting_spacing(self, *a, **k):
        calls["spacing"] += 1
        return spacing_call(self, *a, **k)

    monkeypatch.setattr(LoadImaged, "__call__", counting_load)
    monkeypatch.setattr(Spacingd, "__call__", counting_spacing)
    ct = [e for e in entries if e.modality == "CT"]
    ds = training_dataset(cfg, plan, ct, data_dir=data_dir, modality="ct")
    assert isinstance(ds, CacheDataset)
    assert calls == {"load": len(ct), "spacing": len(ct)}  # filled once, at construction

    # a flat chain: the cache ends exactly where the random part begins (a nested Compose would cache nothing)
    cached = cached_training_transforms(cfg, plan, "ct")
    first_random = ds.transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait))
    assert first_random == len(cached)
    for item in ds._cache:
        assert isinstance(item["image"], MetaTensor) and CLASS_INDICES_KEY in item
        np.testing.assert_allclose(item["image"].pixdim[:3].tolist(), plan.ct.target_spacing, rtol=1e-4)

    seeded = SeededSamples(ds, seed=0)
    for k in range(30):
        sample = seeded[(k % len(ct), k)][0]
        assert sample["image"].shape == (1, 32, 32, 16)
    assert calls == {"load": len(ct), "spacing": len(ct)}


def test_sampling_leaves_the_cache_intact(setup):
    # the cache is not copied per step (copy_cache=False): the random part must never write into it
    data_dir, _, plan, entries = setup
    cfg = load_config(None, OVERRIDES + ["preprocess.albumentations.enabled=true", "preprocess.albumentations.p=1.0"])
    mr = [e for e in entries if e.modality == "MR"]
    ds = training_dataset(cfg, plan, mr, data_dir=data_dir, modality="mr")
    snapshot = [(c["image"].as_tensor().clone(), c["label"].as_tensor().clone(), len(c["image"].applied_operations),
                 [t.clone() for t in c[CLASS_INDICES_KEY]]) for c in ds._cache]
    seeded = SeededSamples(ds, seed=1)
    for k in range(40):
        seeded[(k % len(mr), k)]
    for (img, lab, n_ops, idx), c in zip(snapshot, ds._cache):
        assert torch.equal(img, c["image"].as_tensor()) and torch.equal(lab, c["label"].as_tensor())
        assert n_ops == len(c["image"].applied_operations)
        assert all(torch.equal(a, b) for a, b in zip(idx, c[CLASS_INDICES_KEY]))


def test_device_path_puts_todeviced_after_the_cache_and_gives_the_same_batches(setup):
    data_dir, cfg, plan, entries = setup
    chain = cached_training_transforms(cfg, plan, "ct", device=torch.device("cpu"))
    assert isinstance(chain[-1], ToDeviced)
    assert not any(isinstance(t, RandomizableTrait) for t in chain) and isinstance(random_transforms(cfg, plan, "ct")[0], RandomizableTrait)
    split = split_cases(entries, val_fraction=0.34, seed=0)
    on_device = build_training_stream(cfg, plan, split, data_dir=data_dir, device="cpu")
    plain = build_training_stream(cfg, plan, split, data_dir=data_dir, device=None)
    assert all(isinstance(loader, ThreadDataLoader) for loader in on_device.loaders.values())
    assert isinstance(on_device.loaders["ct"].dataset.dataset.transform.transforms[len(chain) - 1], ToDeviced)
    for _ in range(3):
        a, b = next(on_device), next(plain)
        for m in ("ct", "mr"):
            assert a[m]["image"].device.type == "cpu"
            assert torch.equal(a[m]["image"], b[m]["image"]) and torch.equal(a[m]["label"], b[m]["label"])
