"""MONAI transform chains per modality.

Deterministic part (cached): load, channel first, orientation RAS, resample to the planned spacing,
label values -> class indices, intensity normalization (CT: clip to the planned window, standardize
with dataset statistics; MR: per-image z-score over the body), crop to the body.
Random part (per step): pad to the patch size, patch sampling balanced between foreground classes
and background, 3D affine and intensity augmentation (never a left-right flip: it would swap the
left and right kidney).

The deterministic chain is returned as a flat list so that ``CacheDataset`` really caches it (a
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
    CropForegroundd,
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
    Transform,
)

from medmtl.config import ExperimentConfig
from medmtl.data.plan import Plan

__all__ = [
    "CTWindowZScore", "CTWindowZScored", "ForegroundZScore", "ForegroundZScored", "RemapLabels", "RemapLabelsd",
    "body_mask", "deterministic_transforms", "random_transforms", "target_spacing", "ct_window",
]


def body_mask(x: torch.Tensor | np.ndarray, modality: str) -> torch.Tensor | np.ndarray:
    """Voxels inside the body: CT above -500 HU; MR above 10% of the 99th percentile (raw intensities)."""
    if modality == "ct":
        return x > -500
    flat = x.reshape(-1)
    q = torch.quantile(flat.float()[:: max(1, flat.numel() // 200000)], 0.99) if isinstance(x, torch.Tensor) else np.percentile(flat, 99)
    return x > 0.1 * q


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


def random_transforms(cfg: ExperimentConfig, modality: str) -> list:
    """The per-step random chain: pad, class-balanced patch sampling, augmentation."""
    pp = cfg.preprocess
    n_cls = len(cfg.data.labels[modality])
    # background weight so that foreground classes together get `pos_fraction` of the patches
    fg_each = pp.pos_fraction / n_cls
    ratios = [1.0 - pp.pos_fraction] + [fg_each] * n_cls
    chain: list = [
        SpatialPadd(keys=["image", "label"], spatial_size=pp.patch_size),
        RandCropByLabelClassesd(
            keys=["image", "label"], label_key="label", spatial_size=pp.patch_size, ratios=ratios,
            num_classes=n_cls + 1, num_samples=1, warn=False,
        ),
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
    chain.append(EnsureTyped(keys=["image", "label"], track_meta=False))
    return chain
