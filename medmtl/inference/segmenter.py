"""Whole-volume inference: preprocessing, Gaussian sliding windows, inversion to the input grid.

A prediction is returned on the *original* image grid (shape and affine of the input NIfTI), in the
original label values of the configured label map, so it can be compared with the reference mask
voxel by voxel and written next to the input.

Non-finite voxels (NaN, +-inf) in an input would spread through resampling and the per-image
normalization and make the whole output background: a silent empty mask. They are counted right after
loading and replaced by the modality's background value (:data:`BACKGROUND_VALUE`: air, -1024 HU for CT,
0 for MR); the count is returned with the prediction (``Prediction.nonfinite_voxels``) for the caller to
report. An input with more than :data:`MAX_NONFINITE_FRACTION` of its voxels non-finite is refused
(:class:`~medmtl.errors.InputError`): what is left is not an image to segment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd, MapTransform

from medmtl.config import ExperimentConfig
from medmtl.data.plan import Plan
from medmtl.data.transforms import deterministic_transforms, patch_size
from medmtl.errors import InputError
from medmtl.modality import MODALITIES, parse_modality

__all__ = ["Prediction", "Segmenter", "NonFiniteToBackgroundd", "BACKGROUND_VALUE", "MAX_NONFINITE_FRACTION", "NONFINITE_KEY"]

# what a scanner records outside the body: air (HU) for CT, no signal for MR (arbitrary scale, 0 = none)
BACKGROUND_VALUE = {"ct": -1024.0, "mr": 0.0}
MAX_NONFINITE_FRACTION = 0.5
NONFINITE_KEY = "nonfinite_voxels"


class NonFiniteToBackgroundd(MapTransform):
    """Replace NaN and +-inf voxels of ``keys`` by ``value`` and store their count under :data:`NONFINITE_KEY`.

    Input and output ``(C, X, Y, Z)``, same type and meta data. Raises
    :class:`~medmtl.errors.InputError` when more than ``max_fraction`` of the voxels are non-finite.
    """

    def __init__(self, keys, *, value: float, max_fraction: float = MAX_NONFINITE_FRACTION) -> None:
        super().__init__(keys)
        self.value, self.max_fraction = float(value), max_fraction

    def __call__(self, data):
        d = dict(data)
        total = 0
        for key in self.key_iterator(d):
            img = d[key]
            bad = ~torch.isfinite(img)
            n = int(bad.sum())
            if n:
                if n > self.max_fraction * img.numel():
                    raise InputError(f"{n} of {img.numel()} voxels are NaN or inf; nothing sensible to segment "
                                     "(check the conversion that wrote this image)")
                img = img.clone()
                img[bad] = self.value
                d[key] = img
            total += n
        d[NONFINITE_KEY] = total
        return d


@dataclass
class Prediction:
    """A label map on the input grid: ``labels`` ``(X, Y, Z)`` in original label values, ``affine`` 4x4 RAS."""

    labels: np.ndarray
    affine: np.ndarray
    class_indices: np.ndarray  # (X, Y, Z) class indices 0..n (0 = background)
    nonfinite_voxels: int = 0  # NaN/inf input voxels replaced by the modality's background value
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of preprocess, sliding_window, invert
    probabilities: torch.Tensor | None = None  # (n+1, X, Y, Z) class probabilities, when asked for (validation loss)


class Segmenter:
    """Runs a trained :class:`~medmtl.models.two_column.TwoColumnNet` on whole images of either modality."""

    def __init__(self, net: torch.nn.Module, cfg: ExperimentConfig, plan: Plan, *, device: torch.device | str = "cpu") -> None:
        self.net, self.cfg, self.plan = net, cfg, plan
        self.device = torch.device(device)
        self.pre = {m: Compose(self._chain(cfg, plan, m)) for m in MODALITIES}
        self.roi = {m: patch_size(cfg, plan, m) for m in MODALITIES}
        self.values = {m: np.array([0] + list(cfg.data.labels[m]), dtype=np.int64) for m in MODALITIES}

    @staticmethod
    def _chain(cfg: ExperimentConfig, plan: Plan, modality: str) -> list:
        chain = deterministic_transforms(cfg, plan, modality, with_label=False, crop=False)
        # right after loading: before resampling spreads a NaN to its neighbours
        chain.insert(1, NonFiniteToBackgroundd(keys="image", value=BACKGROUND_VALUE[modality]))
        return chain

    @torch.no_grad()
    def logits(self, image: torch.Tensor, modality: str) -> torch.Tensor:
        """Sliding-window logits ``(1, 1 + n_classes, X, Y, Z)`` for a preprocessed ``(1, X, Y, Z)`` image."""
        ev = self.cfg.eval
        x = image.unsqueeze(0).to(self.device)
        return sliding_window_inference(
            x, roi_size=self.roi[modality], sw_batch_size=ev.sw_batch_size,
            predictor=lambda t: self.net(t, modality).float(), overlap=ev.sw_overlap, mode=ev.sw_mode,
        )

    def predict(self, image: str | Path | torch.Tensor, modality: str, *, name: str | None = None,
                keep_probabilities: bool = False) -> Prediction:
        """Segment one image (a NIfTI path, or a MetaTensor with its affine) of ``modality`` (``ct``/``mr``).

        ``name`` is what errors call the input (default: the path); ``keep_probabilities`` also returns the
        class probabilities on the input grid (the validation loss). Raises
        :class:`~medmtl.errors.InputError` for an image that is mostly NaN or inf.
        """
        given, modality = modality, parse_modality(modality)
        if modality is None:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {given!r}")
        was_training = self.net.training
        self.net.eval()
        t0 = time.perf_counter()
        try:
            try:
                d = self.pre[modality]({"image": image if not isinstance(image, Path) else str(image)})
            except RuntimeError as err:  # MONAI wraps what a transform raises, once per Compose level
                cause = err
                while cause is not None and not isinstance(cause, InputError):
                    cause = cause.__cause__
                if cause is None:
                    raise
                raise InputError(f"{name or (image if isinstance(image, (str, Path)) else 'input image')}: {cause}") from None
            t1 = time.perf_counter()
            probs = torch.softmax(self.logits(d["image"], modality), dim=1)[0].cpu()
            t2 = time.perf_counter()
            d["pred"] = probs
            d["pred"].meta = dict(d["image"].meta)
            d["pred"].applied_operations = list(d["image"].applied_operations)
            inv = Invertd(keys="pred", transform=self.pre[modality], orig_keys="image", nearest_interp=False, to_tensor=True)
            out = inv(d)["pred"]
            idx = torch.argmax(out, dim=0).numpy().astype(np.int64)
            affine = np.asarray(out.affine if hasattr(out, "affine") else d["image"].meta["original_affine"], dtype=np.float64)
        finally:
            self.net.train(was_training)
        seconds = {"preprocess": t1 - t0, "sliding_window": t2 - t1, "invert": time.perf_counter() - t2}
        return Prediction(labels=self.values[modality][idx], affine=affine, class_indices=idx,
                          nonfinite_voxels=int(d.get(NONFINITE_KEY, 0)), seconds=seconds,
                          probabilities=(out.as_tensor() if hasattr(out, "as_tensor") else out).float() if keep_probabilities else None)
