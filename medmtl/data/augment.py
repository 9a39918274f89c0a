"""Slice-consistent in-plane augmentation of 3D volumes with albumentations, as a MONAI transform.

albumentations is strong at 2D geometric warps (affine, grid distortion, elastic) and photometric
changes, all driven by OpenCV. A 3D patch ``(C, X, Y, Z)`` in RAS is cut into its axial slices
``(Z, X, Y, C)`` and passed as the ``images`` target with the label's slices as ``masks``: one draw
of parameters is then applied to every slice and to the mask (nearest interpolation for masks), so
the volume stays coherent along Z. Two albumentations 2.0.8 traps are handled here:

- **Range.** Its float transforms assume float32 in ``[0, 1]`` (brightness, gamma and noise are
  defined on that range and results are clipped to it). Each patch is rescaled from its own
  ``[min, max]`` to ``[0, 1]`` and back afterwards, so the output keeps the input's intensity range
  and the ``*_limit`` and noise parameters are fractions of that range. Fill values of the warps are
  0, i.e. the patch minimum (air on CT), and 0 (background) for the mask.
- **The ``volume`` target** fails for ``RandomBrightnessContrast`` and ``GaussNoise`` in 2.0.8
  (``KeyError: 'images'``), hence the ``images``/``masks`` targets. ``GaussNoise`` on ``images``
  would add the *same* noise field to every slice, so noise is applied separately on the slices
  stacked as channels ``(X, Y, Z*C)`` with ``per_channel=True``: one standard deviation per volume,
  independent noise per voxel.

Randomness comes from the MONAI transform's own ``RandomState`` (seeded like every MONAI random
transform), which seeds albumentations for each call: runs are reproducible for a seed.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform

from medmtl.config import AlbumentationsConfig

if TYPE_CHECKING:
    import albumentations as A

__all__ = ["SliceConsistentAlbumentationsd", "build_slice_pipeline"]


def _albumentations():
    """Import albumentations on first use (its import takes seconds) without its online version check
    (hospital machines are often offline, and training should not reach the network)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations
    import cv2

    return albumentations, cv2


def build_slice_pipeline(cfg: AlbumentationsConfig) -> tuple["A.Compose", "A.Compose"]:
    """``(slices, noise)``: the per-slice albumentations pipeline and the noise pipeline for ``cfg``."""
    A, cv2 = _albumentations()
    slices = A.Compose([
        A.Affine(
            rotate=(-cfg.rotate_deg, cfg.rotate_deg), scale=tuple(cfg.scale),
            translate_percent=(-cfg.translate, cfg.translate), interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=cfg.affine_p,
        ),
        A.GridDistortion(distort_limit=cfg.grid_distort_limit, border_mode=cv2.BORDER_CONSTANT, p=cfg.grid_distortion_p),
        A.ElasticTransform(alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma, border_mode=cv2.BORDER_CONSTANT, p=cfg.elastic_p),
        A.RandomBrightnessContrast(brightness_limit=cfg.brightness_limit, contrast_limit=cfg.contrast_limit, p=cfg.brightness_contrast_p),
        A.RandomGamma(gamma_limit=tuple(cfg.gamma_limit), p=cfg.gamma_p),
    ])
    noise = A.Compose([A.GaussNoise(std_range=tuple(cfg.noise_std), per_channel=True, p=cfg.noise_p)])
    return slices, noise


class SliceConsistentAlbumentationsd(RandomizableTransform, MapTransform):
    """Apply one albumentations draw to every axial slice of a 3D image and its label.

    Args:
        keys: image keys, each ``(C, X, Y, Z)`` float (tensor, MetaTensor or array; any device).
        label_keys: label keys, each ``(1, X, Y, Z)`` integer class indices (< 256), warped with the image.
        slices: albumentations pipeline applied to the slices (``images`` / ``masks`` targets).
        noise: albumentations pipeline applied to the slices stacked as channels (``image`` target), or ``None``.
        prob: probability that a call augments at all.

    Returns the same types, shapes, dtypes and devices; images keep their ``[min, max]`` range.
    """

    def __init__(self, *, keys: KeysCollection, label_keys: KeysCollection = (), slices: "A.Compose", noise: "A.Compose | None" = None,
                 prob: float = 1.0, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        self.slices, self.noise = slices, noise
        self._seed = 0

    @classmethod
    def from_config(cls, cfg: AlbumentationsConfig, *, keys: KeysCollection = "image", label_keys: KeysCollection = "label") -> "SliceConsistentAlbumentationsd":
        """The transform configured by ``preprocess.albumentations``."""
        slices, noise = build_slice_pipeline(cfg)
        return cls(keys=keys, label_keys=label_keys, slices=slices, noise=noise, prob=cfg.p)

    def randomize(self, data=None) -> None:
        """Decide whether to augment and draw the albumentations seed from this transform's ``RandomState``."""
        super().randomize(None)
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Augment ``keys`` and ``label_keys`` of a copy of ``data`` (see the class docstring)."""
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        image_keys = list(self.key_iterator(d))
        label_keys = [k for k in self.label_keys if k in d]
        if len(image_keys) != 1:
            raise ValueError(f"SliceConsistentAlbumentationsd takes exactly one image key present in the data, got {image_keys}")
        key = image_keys[0]
        img, lo, scale = _to_unit_slices(d[key])
        masks = [_label_slices(d[k]) for k in label_keys]
        self.slices.set_random_seed(self._seed)
        kwargs = {"images": img}
        if masks:
            kwargs["masks"] = np.concatenate(masks, axis=0) if len(masks) > 1 else masks[0]
        out = self.slices(**kwargs)
        img = np.asarray(out["images"], dtype=np.float32)
        if self.noise is not None:
            img = self._add_noise(img)
        d[key] = _restore_image(img, lo, scale, like=d[key])
        if masks:
            warped = np.asarray(out["masks"])
            n_z = masks[0].shape[0]
            for i, k in enumerate(label_keys):
                d[k] = _restore_label(warped[i * n_z:(i + 1) * n_z], like=d[k])
        return d

    def _add_noise(self, img: np.ndarray) -> np.ndarray:
        z, x, y, c = img.shape
        stacked = np.ascontiguousarray(img.transpose(1, 2, 0, 3).reshape(x, y, z * c))
        self.noise.set_random_seed(self._seed + 1)
        noisy = np.asarray(self.noise(image=stacked)["image"], dtype=np.float32)
        return noisy.reshape(x, y, z, c).transpose(2, 0, 1, 3)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _to_unit_slices(img) -> tuple[np.ndarray, float, float]:
    """``(C, X, Y, Z)`` -> float32 slices ``(Z, X, Y, C)`` in ``[0, 1]``, with the offset and scale to undo it."""
    arr = _numpy(img).astype(np.float32, copy=False)
    if arr.ndim != 4:
        raise ValueError(f"expected an image (C, X, Y, Z), got shape {arr.shape}")
    lo, hi = float(arr.min()), float(arr.max())
    scale = hi - lo if hi > lo else 1.0
    return np.ascontiguousarray(((arr - lo) / scale).transpose(3, 1, 2, 0)), lo, scale


def _label_slices(lab) -> np.ndarray:
    """``(1, X, Y, Z)`` class indices -> uint8 slices ``(Z, X, Y)``."""
    arr = _numpy(lab)
    if arr.ndim != 4 or arr.shape[0] != 1:
        raise ValueError(f"expected a label (1, X, Y, Z), got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("label values must lie in 0..255 for albumentations masks")
    return np.ascontiguousarray(arr[0].transpose(2, 0, 1).astype(np.uint8))


def _like(arr: np.ndarray, like):
    """``arr`` as the type, dtype and device of ``like`` (a MetaTensor keeps its metadata)."""
    if isinstance(like, torch.Tensor):
        out = torch.as_tensor(arr, device=like.device).to(like.dtype)
        if isinstance(like, MetaTensor):
            out = MetaTensor(out, meta=like.meta, applied_operations=list(like.applied_operations))
        return out
    return arr.astype(np.asarray(like).dtype, copy=False)


def _restore_image(slices: np.ndarray, lo: float, scale: float, *, like):
    # clip: a few warps may interpolate marginally outside [0, 1]; the range must be the input's
    arr = np.clip(slices, 0.0, 1.0).transpose(3, 1, 2, 0) * scale + lo
    return _like(np.ascontiguousarray(arr, dtype=np.float32), like)


def _restore_label(slices: np.ndarray, *, like):
    return _like(np.ascontiguousarray(slices.transpose(1, 2, 0)[None]), like)
