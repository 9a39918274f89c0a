"""MONAI transform chains per modality.

Deterministic part (cached): load, channel first, orientation RAS, resample to the planned spacing,
crop to the body, intensity normalization (CT: clip to the planned window, standardize with the
dataset's foreground statistics, so the dataset's foreground has mean 0 and std 1; MR: per-image
z-score over the body, so each image's body has mean 0 and std 1), label values -> class indices;
for training also: pad to the patch size and the voxel positions of each class (so that patch
sampling does not search the label map at every step), then, on CUDA, ``ToDeviced`` so that the cache
lives on the GPU and the random part runs there.
Random part (per step): patch sampling with ``pos_fraction`` of the patches centred on a foreground
class (classes equally likely), 3D affine and intensity augmentation (never a left-right flip: it
would swap the left and right kidney), optionally slice-consistent albumentations
(:mod:`medmtl.data.augment`).

Chains are returned as flat lists so that ``CacheDataset`` really caches the deterministic part (a
nested ``Compose`` counts as one random transform and silently caches nothing).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    ClassesToIndicesd,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAffined,
    RandCropByLabelClassesd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
    ToDeviced,
    Transform,
)

from medmtl.config import ExperimentConfig
from medmtl.data.augment import SliceConsistentAlbumentationsd
from medmtl.data.plan import Plan, body_mask, resolve_plan

__all__ = [
    "CTWindowZScore", "CTWindowZScored", "ForegroundZScore", "ForegroundZScored", "RemapLabels", "RemapLabelsd",
    "body_mask", "deterministic_transforms", "cached_training_transforms", "random_transforms", "target_spacing",
    "ct_window", "patch_size", "CLASS_INDICES_KEY", "MAX_POSITIONS_PER_CLASS",
]

CLASS_INDICES_KEY = "label_cls_indices"
# nnU-Net keeps at most 10000 voxel positions per class for foreground sampling; evenly spaced, deterministic
MAX_POSITIONS_PER_CLASS = 10000


class _BodySelect:
    """Picklable ``select_fn`` for ``CropForegroundd`` (worker processes need to pickle it)."""

    def __init__(self, modality: str) -> None:
        self.modality = modality

    def __call__(self, x):
        return body_mask(x, self.modality)


class CTWindowZScore(Transform):
    """Clip HU to ``[lo, hi]`` and standardize with the dataset's foreground ``mean`` and ``std``."""

    def __init__(self, lo: float, hi: float, mean: float, std: float) -> None:
        self.lo, self.hi, self.mean, self.std = lo, hi, mean, max(std, 1e-6)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """``(C, ...) -> (C, ...)`` float32."""
        return (img.float().clamp(self.lo, self.hi) - self.mean) / self.std


class ForegroundZScore(Transform):
    """Per-image z-score with mean and std over the body mask (MR, arbitrary scanner scale)."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """``(C, ...) -> (C, ...)`` float32; the background is standardized with the same statistics."""
        img = img.float()
        fg = img[body_mask(img, "mr")]
        if fg.numel() < 2:
            fg = img.reshape(-1)
        return (img - fg.mean()) / fg.std().clamp_min(1e-6)


class RemapLabels(Transform):
    """Map label values to class indices ``1..n`` in the configured order; unlisted values -> 0."""

    def __init__(self, labels: Mapping[int, str]) -> None:
        self.values = list(labels)
        self.lut = np.zeros(max(self.values) + 1, dtype=np.int64)
        for idx, value in enumerate(self.values, start=1):
            self.lut[value] = idx

    def __call__(self, lab: torch.Tensor) -> torch.Tensor:
        """Integer label map of any shape -> class indices of the same shape."""
        arr = lab.long()
        arr = arr.clamp(min=0)
        lut = torch.as_tensor(self.lut, device=arr.device)
        out = torch.where(arr < len(lut), lut[arr.clamp(max=len(lut) - 1)], torch.zeros_like(arr))
        return out.to(torch.uint8) if len(self.values) < 255 else out


class _ArrayMapd(MapTransform):
    """Dictionary wrapper: apply an array transform to ``keys`` on a copy of the input dictionary."""

    def __init__(self, keys: KeysCollection, fn: Transform, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.fn = fn

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.fn(d[key])
        return d


class CTWindowZScored(_ArrayMapd):
    """Dictionary version of :class:`CTWindowZScore`."""

    def __init__(self, keys: KeysCollection, lo: float, hi: float, mean: float, std: float, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, CTWindowZScore(lo, hi, mean, std), allow_missing_keys)


class ForegroundZScored(_ArrayMapd):
    """Dictionary version of :class:`ForegroundZScore`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, ForegroundZScore(), allow_missing_keys)


class RemapLabelsd(_ArrayMapd):
    """Dictionary version of :class:`RemapLabels`."""

    def __init__(self, keys: KeysCollection, labels: Mapping[int, str], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, RemapLabels(labels), allow_missing_keys)


def _load_nifti(keys: list[str]) -> LoadImaged:
    """``LoadImaged`` reading NIfTI with nibabel.

    MONAI instantiates every default reader anyway, and its GPU DICOM reader warns on machines
    without nvImageCodec; ingested data is NIfTI, so that warning is noise and is silenced here.
    """
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        return LoadImaged(keys=keys, image_only=True, reader="NibabelReader")


def target_spacing(cfg: ExperimentConfig, plan: Plan, modality: str) -> tuple[float, float, float]:
    """Resampling spacing: the config's override, else the plan's."""
    override = cfg.preprocess.target_spacing.get(modality)
    return tuple(override) if override is not None else tuple(plan.for_modality(modality).target_spacing)


def ct_window(cfg: ExperimentConfig, plan: Plan) -> tuple[float, float, float, float]:
    """``(lo, hi, mean, std)`` for CT: the config's window override, else the plan's percentiles."""
    it = plan.ct.intensity
    lo, hi = cfg.preprocess.ct_window if cfg.preprocess.ct_window is not None else (it["p00_5"], it["p99_5"])
    return float(lo), float(hi), float(it["mean"]), float(it["std"])


def patch_size(cfg: ExperimentConfig, plan: Plan, modality: str) -> tuple[int, int, int]:
    """Training and sliding-window patch: the config's ``preprocess.patch_size``, else the plan's for ``cfg``."""
    if cfg.preprocess.patch_size is not None:
        return tuple(int(p) for p in cfg.preprocess.patch_size)
    return tuple(int(p) for p in resolve_plan(plan, cfg).for_modality(modality).patch_size)


def deterministic_transforms(cfg: ExperimentConfig, plan: Plan, modality: str, *, with_label: bool = True, crop: bool = True) -> list:
    """The cacheable chain for ``modality`` (``"ct"`` or ``"mr"``), as a flat list.

    Input dict: ``{"image": path, "label": path}``; output: ``image`` ``(1, X, Y, Z)`` float32 in RAS
    at the target spacing, ``label`` ``(1, X, Y, Z)`` uint8 class indices.
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    chain: list = [
        _load_nifti(keys),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=None),
        Spacingd(keys=keys, pixdim=target_spacing(cfg, plan, modality), mode=modes),
    ]
    if crop:
        chain.append(CropForegroundd(keys=keys, source_key="image", select_fn=_BodySelect(modality), margin=2, allow_smaller=True))
    if modality == "ct":
        lo, hi, mean, std = ct_window(cfg, plan)
        chain.append(CTWindowZScored(keys="image", lo=lo, hi=hi, mean=mean, std=std))
    else:
        chain.append(ForegroundZScored(keys="image"))
    if with_label:
        chain.append(RemapLabelsd(keys="label", labels=cfg.data.labels[modality]))
    chain.append(EnsureTyped(keys=keys, track_meta=True))
    return chain


def cached_training_transforms(cfg: ExperimentConfig, plan: Plan, modality: str, *, device: torch.device | None = None) -> list:
    """The deterministic training chain (what ``CacheDataset`` keeps), as a flat list.

    :func:`deterministic_transforms`, then padding to the patch size and the positions of each class
    (``CLASS_INDICES_KEY``, at most ``MAX_POSITIONS_PER_CLASS`` each) for :func:`random_transforms`.
    With ``device`` (CUDA in training; any device in tests), ``ToDeviced`` moves image and label
    there last, so the cache holds device tensors and the random part runs on that device.
    """
    n_cls = len(cfg.data.labels[modality])
    chain = deterministic_transforms(cfg, plan, modality) + [
        SpatialPadd(keys=["image", "label"], spatial_size=patch_size(cfg, plan, modality)),
        ClassesToIndicesd(keys="label", indices_postfix="_cls_indices", num_classes=n_cls + 1, max_samples_per_class=MAX_POSITIONS_PER_CLASS),
    ]
    if device is not None:
        chain.append(ToDeviced(keys=["image", "label"], device=device))
    return chain


def random_transforms(cfg: ExperimentConfig, plan: Plan, modality: str) -> list:
    """The per-step random chain after :func:`cached_training_transforms`: patch sampling, augmentation.

    Output: ``image`` ``(1, *patch)`` float32 and ``label`` ``(1, *patch)`` class indices, plain tensors.
    A class absent from an image is skipped for that image (its share goes to the other classes).
    """
    pp = cfg.preprocess
    n_cls = len(cfg.data.labels[modality])
    patch = patch_size(cfg, plan, modality)
    # background weight so that foreground classes together get `pos_fraction` of the patches
    fg_each = pp.pos_fraction / n_cls
    ratios = [1.0 - pp.pos_fraction] + [fg_each] * n_cls
    chain: list = [
        RandCropByLabelClassesd(
            keys=["image", "label"], label_key="label", spatial_size=patch, ratios=ratios,
            num_classes=n_cls + 1, num_samples=1, indices_key=CLASS_INDICES_KEY, warn=False,
        ),
        DeleteItemsd(keys=CLASS_INDICES_KEY),  # per-image lists of positions cannot be collated
    ]
    if pp.augment:
        chain += [
            RandAffined(
                keys=["image", "label"], prob=0.3, rotate_range=(0.0, 0.0, 0.26), scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"), padding_mode="border",
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.3),
            RandGaussianNoised(keys="image", std=0.05, prob=0.15),
        ]
    if pp.albumentations.enabled:
        chain.append(SliceConsistentAlbumentationsd.from_config(pp.albumentations, keys="image", label_keys="label"))
    chain.append(EnsureTyped(keys=["image", "label"], track_meta=False))
    return chain
