"""The plan: nnU-Net's target-spacing rule, intensity statistics and shapes computed by hand on a synthetic
dataset, the memory-budget choice of patch and batch, the activation estimate, and config overrides."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medmtl.config import ExperimentConfig, load_config
from medmtl.data.manifest import read_manifest
from medmtl.errors import DataError
from medmtl.data.plan import (
    PLAN_VERSION, activation_bytes_per_voxel, choose_patch_and_batch, compute_plan, load_plan, nnunet_target_spacing,
    resolve_plan, save_plan,
)
from medmtl.models.two_column import TwoColumnNet

ALL_VOXELS = ["preprocess.fg_samples_per_image=1000000000"]


@pytest.fixture(scope="module")
def planned(tiny_dataset):
    data_dir, synth = tiny_dataset
    cfg = load_config(None, ALL_VOXELS)
    return data_dir, cfg, compute_plan(data_dir, cfg)


# ------------------------------------------------------------------------------------ target spacing
def test_median_spacing_when_not_anisotropic():
    spacings = np.array([[0.7, 0.7, 1.0], [0.8, 0.8, 1.2], [0.9, 0.9, 1.5]])
    shapes = np.array([[512, 512, 300]] * 3)
    target, aniso = nnunet_target_spacing(spacings, shapes)
    assert not aniso and np.allclose(target, [0.8, 0.8, 1.2])


def test_thick_slices_with_few_voxels_take_the_10th_percentile():
    spacings = np.array([[0.8, 0.8, z] for z in (2.5, 5.0, 5.0, 5.0, 10.0)])
    shapes = np.array([[256, 256, 20]] * 5)
    target, aniso = nnunet_target_spacing(spacings, shapes)
    # 10th percentile of (2.5, 5, 5, 5, 10): position 0.4 between 2.5 and 5 -> 3.5
    assert aniso and np.allclose(target, [0.8, 0.8, 3.5])


def test_coarse_axis_with_many_voxels_keeps_the_median():
    # nnU-Net also needs the coarse axis to have > 3x fewer voxels; here it has as many as the others
    spacings = np.array([[0.8, 0.8, z] for z in (2.5, 5.0, 5.0, 5.0, 10.0)])
    shapes = np.array([[256, 256, 256]] * 5)
    target, aniso = nnunet_target_spacing(spacings, shapes)
    assert not aniso and np.allclose(target, [0.8, 0.8, 5.0])


def test_ratio_is_against_the_largest_other_axis():
    # 5 > 3 * 1 (smallest other) but not > 3 * 2 (largest other): nnU-Net keeps the median
    spacings = np.array([[1.0, 2.0, 5.0]] * 3)
    shapes = np.array([[200, 200, 20]] * 3)
    target, aniso = nnunet_target_spacing(spacings, shapes)
    assert not aniso and np.allclose(target, [1.0, 2.0, 5.0])


def test_coarse_axis_never_becomes_finer_than_the_others():
    spacings = np.array([[1.0, 1.0, z] for z in (0.2, 0.5, 4.0, 4.0, 4.0)])
    shapes = np.array([[300, 300, 30]] * 5)
    target, aniso = nnunet_target_spacing(spacings, shapes)
    # 10th percentile 0.32 < 1.0 -> max(other spacings) + 1e-5
    assert aniso and np.allclose(target, [1.0, 1.0, 1.0 + 1e-5], rtol=0, atol=1e-9)


# -------------------------------------------------------------------------- plan on a synthetic dataset
def _ras_spacing_by_hand(affine: np.ndarray) -> np.ndarray:
    """Column norms of the affine, placed on the world axis each voxel axis mostly runs along."""
    out = np.zeros(3)
    for j in range(3):
        out[int(np.argmax(np.abs(affine[:3, j])))] = np.linalg.norm(affine[:3, j])
    return out


def test_plan_equals_values_computed_by_hand(planned):
    data_dir, cfg, plan = planned
    entries = read_manifest(data_dir)
    for m in ("ct", "mr"):
        ents = [e for e in entries if e.modality == m.upper()]
        spacings = np.array([_ras_spacing_by_hand(nib.load(str(data_dir / e.image)).affine) for e in ents])
        mp = plan.for_modality(m)
        assert mp.n_images == len(ents) and mp.n_labelled == sum(e.label is not None for e in ents)
        np.testing.assert_allclose(mp.spacings, spacings, rtol=1e-5)
        np.testing.assert_allclose(mp.median_spacing, np.median(spacings, axis=0), rtol=1e-5)
        # synthetic spacings are ~1.4x anisotropic at most: the target is the median
        assert not mp.anisotropic
        np.testing.assert_allclose(mp.target_spacing, np.median(spacings, axis=0), rtol=1e-5)
        expected_shape = np.median(np.round(spacings / np.median(spacings, axis=0) * np.array(mp.shapes_after_crop)), axis=0)
        assert mp.median_shape_at_target == [int(x) for x in expected_shape]

    ct_entries = [e for e in entries if e.modality == "CT" and e.label is not None]
    fg = np.concatenate([
        np.asarray(nib.load(str(data_dir / e.image)).dataobj, dtype=np.float64)[np.asarray(nib.load(str(data_dir / e.label)).dataobj) > 0]
        for e in ct_entries
    ])
    lo, hi = np.percentile(fg, [0.5, 99.5])
    clipped = np.clip(fg, lo, hi)
    it = plan.ct.intensity
    assert it["n_voxels"] == fg.size
    assert it["p00_5"] == pytest.approx(lo) and it["p99_5"] == pytest.approx(hi)
    assert it["mean"] == pytest.approx(clipped.mean()) and it["std"] == pytest.approx(clipped.std())
    assert plan.ct.normalization == "ct_window_zscore" and plan.mr.normalization == "zscore_foreground" and plan.mr.intensity == {}


def test_shape_after_crop_is_the_body_box_by_hand(planned):
    data_dir, _, plan = planned
    e = next(e for e in read_manifest(data_dir) if e.modality == "CT")
    arr = np.asarray(nib.load(str(data_dir / e.image)).dataobj)
    idx = np.argwhere(arr > -500)
    box = np.minimum(idx.max(0) + 1 + 2, arr.shape) - np.maximum(idx.min(0) - 2, 0)
    assert plan.ct.shapes_after_crop[0] == [int(x) for x in box]  # axial LPS: voxel axes are already x, y, z


def test_planned_patch_fits_the_budget_and_the_network(planned):
    _, cfg, plan = planned
    for m in ("ct", "mr"):
        mp = plan.for_modality(m)
        assert all(p % 8 == 0 for p in mp.patch_size)  # 4 levels -> divisible by 2**3
        assert mp.batch_size >= cfg.preprocess.min_batch_size
        mem = mp.memory["bytes_per_voxel"] * mp.memory["paths"] * np.prod(mp.patch_size) * mp.batch_size / 2**20
        assert mem == pytest.approx(mp.memory["estimate_mb"], abs=0.1) and mem <= cfg.preprocess.memory_budget_mb


# ------------------------------------------------------------------------------ patch and batch size
def test_patch_shrinks_until_the_minimum_batch_fits():
    # initial patch: isotropic spacing -> 256^3 clipped to the median 100^3 -> rounded up to 104^3;
    # 104^3 * 2 * 1000 B = 2145 MB > 2100 MB: one shrink of the last of the (tied) largest axes -> 104x104x96 = 1980 MB
    patch, batch, est = choose_patch_and_batch(median_shape=(100, 100, 100), spacing=(1, 1, 1), n_images=10,
                                               bytes_per_voxel=1000, budget_mb=2100, divisor=8)
    assert patch == [104, 104, 96] and batch == 2
    assert est == pytest.approx(1000 * 104 * 104 * 96 * 2 / 2**20)


def test_leftover_budget_raises_the_batch_up_to_the_dataset_cap():
    # floor(100000 MB / (1000 B * 104^3)) = 93 patches, but 5% of 1000 images of 100^3 voxels is 44 patches
    patch, batch, _ = choose_patch_and_batch(median_shape=(100, 100, 100), spacing=(1, 1, 1), n_images=1000,
                                             bytes_per_voxel=1000, budget_mb=100_000, divisor=8)
    assert patch == [104, 104, 104] and batch == 44


def test_patch_follows_the_spacing_aspect_ratio():
    # 2 mm slices: half as many voxels along z as in-plane for the same extent in mm
    patch, _, _ = choose_patch_and_batch(median_shape=(400, 400, 400), spacing=(1, 1, 2), n_images=10,
                                         bytes_per_voxel=1, budget_mb=1e6, divisor=16)
    assert patch[0] == patch[1] and abs(patch[2] - patch[0] / 2) <= 16


def test_a_budget_too_small_names_the_key():
    with pytest.raises(DataError, match="preprocess.memory_budget_mb"):
        choose_patch_and_batch(median_shape=(64, 64, 64), spacing=(1, 1, 1), n_images=4, bytes_per_voxel=1e6, budget_mb=1, divisor=8)


@pytest.mark.parametrize("channels,res_units", [((8, 16, 32, 64), 1), ((4, 8, 16), 0), ((8, 16, 32), 2)])
def test_activation_estimate_matches_what_autograd_saves(channels, res_units):
    cfg = load_config(None, [f"model.channels={list(channels)}", f"model.num_res_units={res_units}"])
    net = TwoColumnNet(cfg=cfg)
    params = {p.data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    size = 32
    x = torch.randn(1, 1, size, size, size)
    y = torch.randint(0, 5, (1, 1, size, size, size))
    from monai.losses import DiceCELoss

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        DiceCELoss(to_onehot_y=True, softmax=True)(net(x, "ct"), y)
    measured = sum(saved.values()) / size**3
    assert activation_bytes_per_voxel(cfg.model, 5) == pytest.approx(measured, rel=0.05)


# ----------------------------------------------------------------------------------- overrides, files
def test_config_overrides_and_rederivation(planned):
    _, cfg, plan = planned
    over = load_config(None, ALL_VOXELS + ["preprocess.target_spacing.ct=[6.0, 6.0, 6.0]", "preprocess.ct_window=[-100, 300]",
                                           "preprocess.patch_size=[32, 32, 16]"])
    r = resolve_plan(plan, over)
    assert r.ct.target_spacing == [6.0, 6.0, 6.0] and r.ct.intensity["p00_5"] == -100 and r.ct.intensity["p99_5"] == 300
    assert r.ct.patch_size == [32, 32, 16] and r.mr.patch_size == [32, 32, 16]
    assert {"preprocess.target_spacing", "preprocess.ct_window", "preprocess.patch_size"} <= set(r.ct.overrides)
    assert plan.ct.target_spacing != [6.0, 6.0, 6.0] and plan.ct.overrides == []  # the input plan is untouched

    # a bigger model needs more memory per voxel: with the same (null) patch setting the plan is re-derived
    big = load_config(None, ALL_VOXELS + ["model.channels=[32, 64, 128, 256]", "preprocess.memory_budget_mb=200"])
    big.preprocess.patch_size = None
    rb = resolve_plan(plan, big)
    assert rb.ct.memory["bytes_per_voxel"] > plan.ct.memory["bytes_per_voxel"]
    assert rb.ct.memory["estimate_mb"] <= 200 and np.prod(rb.ct.patch_size) < np.prod(plan.ct.patch_size)


def test_plan_json_round_trip_and_old_versions_are_refused(planned, tmp_path):
    _, _, plan = planned
    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan
    raw = json.loads(path.read_text())
    raw["version"] = 1
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="medmtl plan DATA_DIR"):
        load_plan(path)


def test_default_config_plans_without_a_config(tiny_dataset):
    data_dir, _ = tiny_dataset
    plan = compute_plan(data_dir)
    assert plan.version == PLAN_VERSION and plan.ct.memory["budget_mb"] == ExperimentConfig().preprocess.memory_budget_mb
