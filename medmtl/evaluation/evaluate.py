"""Held-out evaluation: Dice per class per modality on the original image grids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medmtl.data.manifest import ManifestEntry
from medmtl.data.transforms import RemapLabels
from medmtl.inference.segmenter import Segmenter
from medmtl.evaluation.metrics import dice_per_class, hd95_per_class, mean_ignoring_nan
from medmtl.errors import DataError

__all__ = ["Evaluation", "evaluate_cases", "probability_loss"]


def probability_loss(probabilities: torch.Tensor, reference: np.ndarray, eps: float = 1e-5) -> float:
    """The training objective (MONAI ``DiceCELoss(include_background=False)``: soft Dice loss over the
    foreground classes plus cross-entropy) of class ``probabilities`` ``(C, X, Y, Z)`` against class
    indices ``reference`` ``(X, Y, Z)``: ``mean_c(1 - (2 sum p_c g_c + eps) / (sum p_c + sum g_c + eps)) - mean log p_ref``.
    """
    p = probabilities.float().clamp_min(0)
    ref = torch.as_tensor(reference, dtype=torch.long)
    onehot = torch.nn.functional.one_hot(ref, p.shape[0]).movedim(-1, 0).float()
    dims = tuple(range(1, p.ndim))
    inter, denom = (p * onehot).sum(dims)[1:], (p.sum(dims) + onehot.sum(dims))[1:]
    dice_loss = (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()
    ce = -torch.log(p.gather(0, ref[None]).clamp_min(1e-8)).mean()
    return float(dice_loss + ce)


@dataclass
class Evaluation:
    """Per-case and mean Dice, keyed by modality and class name."""

    per_case: list[dict] = field(default_factory=list)
    mean_dice: dict[str, dict[str, float]] = field(default_factory=dict)
    mean_hd95: dict[str, dict[str, float]] = field(default_factory=dict)  # mm; filled when HD95 was computed
    mean_loss: dict[str, float] = field(default_factory=dict)  # the training loss (Dice + CE) per modality, when computed

    @classmethod
    def from_per_case(cls, per_case: list[dict], labels: dict[str, dict[int, str]]) -> "Evaluation":
        """Means per class and modality from per-case rows (e.g. gathered from several ranks)."""
        ev = cls(per_case=list(per_case))
        for m, mapping in labels.items():
            rows = [r for r in per_case if r["modality"] == m]
            if not rows:
                continue
            per_class = {n: mean_ignoring_nan([r[n] for r in rows]) for n in mapping.values()}
            per_class["mean"] = mean_ignoring_nan(list(per_class.values()))
            ev.mean_dice[m] = per_class
            if all(f"hd95/{n}" in r for r in rows for n in mapping.values()):
                hd = {n: mean_ignoring_nan([r[f"hd95/{n}"] for r in rows]) for n in mapping.values()}
                hd["mean"] = mean_ignoring_nan(list(hd.values()))
                ev.mean_hd95[m] = hd
            if all("loss" in r for r in rows):
                ev.mean_loss[m] = mean_ignoring_nan([r["loss"] for r in rows])
        return ev

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{prefix}dice/<modality>/<class>``, ``{prefix}dice/<modality>/mean`` and, when computed,
        ``{prefix}loss/<modality>`` values."""
        out = {}
        for m, per_class in self.mean_dice.items():
            for name, v in per_class.items():
                out[f"{prefix}dice/{m}/{name}"] = v
        out.update({f"{prefix}loss/{m}": v for m, v in self.mean_loss.items()})
        return out


def evaluate_cases(segmenter: Segmenter, entries: dict[str, list[ManifestEntry]], data_dir: str | Path,
                   labels: dict[str, dict[int, str]], *, hd95: bool = False, loss: bool = False) -> Evaluation:
    """Segment every held-out image and compare with its mask voxel by voxel on the original grid.

    Per-case rows hold Dice under each class name; with ``hd95=True`` the 95th-percentile Hausdorff
    distance in mm under ``hd95/<class>`` (slower: surface distances per class); with ``loss=True`` the
    training loss (soft Dice over the foreground classes + cross-entropy) of the predicted probabilities
    under ``loss`` (see :func:`probability_loss`).
    """
    data_dir = Path(data_dir)
    ev = Evaluation()
    for m, items in entries.items():
        names = list(labels[m].values())
        remap = RemapLabels(labels[m])
        for e in items:
            pred = segmenter.predict(data_dir / e.image, m, keep_probabilities=loss)
            ref_img = nib.load(str(data_dir / e.label))
            ref = remap(torch.as_tensor(np.asarray(ref_img.dataobj))).numpy()
            if not np.allclose(ref_img.affine, pred.affine, atol=1e-3):
                raise DataError(f"{e.label}: prediction affine differs from the reference mask's; the image and mask grids disagree")
            d = dice_per_class(pred.class_indices, ref, len(names))
            row = {"case_id": e.case_id, "series_key": e.series_key, "modality": m, **{n: float(v) for n, v in zip(names, d)}}
            if hd95:
                h = hd95_per_class(pred.class_indices, ref, len(names), tuple(float(z) for z in ref_img.header.get_zooms()[:3]))
                row.update({f"hd95/{n}": float(v) for n, v in zip(names, h)})
            if loss:
                row["loss"] = probability_loss(pred.probabilities, ref)
            ev.per_case.append(row)
    return Evaluation.from_per_case(ev.per_case, {m: labels[m] for m in entries})
