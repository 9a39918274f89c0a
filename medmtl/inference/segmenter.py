"""Whole-volume inference: preprocessing, Gaussian sliding windows, inversion to the input grid.

A prediction is returned on the *original* image grid (shape and affine of the input NIfTI), in the
original label values of the configured label map, so it can be compared with the reference mask
voxel by voxel and written next to the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd

from medmtl.config import ExperimentConfig
from medmtl.data.plan import Plan
from medmtl.data.transforms import deterministic_transforms, patch_size
from medmtl.modality import MODALITIES, parse_modality

__all__ = ["Prediction", "Segmenter"]


@dataclass
class Prediction:
    """A label map on the input grid: ``labels`` ``(X, Y, Z)`` in original label values, ``affine`` 4x4 RAS."""

    labels: np.ndarray
    affine: np.ndarray
    class_indices: np.ndarray  # (X, Y, Z) class indices 0..n (0 = background)
    probabilities: torch.Tensor | None = None  # (n+1, X, Y, Z) class probabilities, when asked for (validation loss)


class Segmenter:
    """Runs a trained :class:`~medmtl.models.two_column.TwoColumnNet` on whole images of either modality."""

    def __init__(self, net: torch.nn.Module, cfg: ExperimentConfig, plan: Plan, *, device: torch.device | str = "cpu") -> None:
        self.net, self.cfg, self.plan = net, cfg, plan
        self.device = torch.device(device)
        self.pre = {m: Compose(deterministic_transforms(cfg, plan, m, with_label=False, crop=False)) for m in MODALITIES}
        self.roi = {m: patch_size(cfg, plan, m) for m in MODALITIES}
        self.values = {m: np.array([0] + list(cfg.data.labels[m]), dtype=np.int64) for m in MODALITIES}

    @torch.no_grad()
    def logits(self, image: torch.Tensor, modality: str) -> torch.Tensor:
        """Sliding-window logits ``(1, 1 + n_classes, X, Y, Z)`` for a preprocessed ``(1, X, Y, Z)`` image."""
        ev = self.cfg.eval
        x = image.unsqueeze(0).to(self.device)
        return sliding_window_inference(
            x, roi_size=self.roi[modality], sw_batch_size=ev.sw_batch_size,
            predictor=lambda t: self.net(t, modality).float(), overlap=ev.sw_overlap, mode=ev.sw_mode,
        )

    def predict(self, image: str | Path | torch.Tensor, modality: str, *, keep_probabilities: bool = False) -> Prediction:
        """Segment one image (a NIfTI path, or a MetaTensor with its affine) of ``modality`` (``ct``/``mr``);
        ``keep_probabilities`` also returns the class probabilities on the input grid."""
        given, modality = modality, parse_modality(modality)
        if modality is None:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {given!r}")
        was_training = self.net.training
        self.net.eval()
        try:
            d = self.pre[modality]({"image": image if not isinstance(image, Path) else str(image)})
            probs = torch.softmax(self.logits(d["image"], modality), dim=1)[0].cpu()
            d["pred"] = probs
            d["pred"].meta = dict(d["image"].meta)
            d["pred"].applied_operations = list(d["image"].applied_operations)
            inv = Invertd(keys="pred", transform=self.pre[modality], orig_keys="image", nearest_interp=False, to_tensor=True)
            out = inv(d)["pred"]
            idx = torch.argmax(out, dim=0).numpy().astype(np.int64)
            affine = np.asarray(out.affine if hasattr(out, "affine") else d["image"].meta["original_affine"], dtype=np.float64)
        finally:
            self.net.train(was_training)
        return Prediction(labels=self.values[modality][idx], affine=affine, class_indices=idx,
                          probabilities=(out.as_tensor() if hasattr(out, "as_tensor") else out).float() if keep_probabilities else None)
