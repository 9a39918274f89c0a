"""Segmentation metrics computed exactly on integer label maps."""

from __future__ import annotations

import numpy as np

__all__ = ["dice_per_class", "mean_ignoring_nan"]


def dice_per_class(pred: np.ndarray, label: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice ``2|P∩G| / (|P| + |G|)`` for classes ``1..n_classes`` of two label maps of equal shape.

    A class absent from both prediction and reference gives NaN (undefined, excluded from means);
    absent from one only gives 0.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {label.shape}")
    p = pred.reshape(-1).astype(np.int64)
    g = label.reshape(-1).astype(np.int64)
    k = n_classes + 1
    # one bincount over (pred, ref) pairs gives every class's intersection and sizes at once
    conf = np.bincount(np.clip(p, 0, n_classes) * k + np.clip(g, 0, n_classes), minlength=k * k).reshape(k, k)
    inter = np.diag(conf)[1:].astype(np.float64)
    sizes = conf.sum(axis=1)[1:] + conf.sum(axis=0)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes > 0, 2.0 * inter / sizes, np.nan)


def mean_ignoring_nan(values: list[float] | np.ndarray) -> float:
    """Mean over the finite values (NaN when there are none)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def hd95_per_class(pred: np.ndarray, label: np.ndarray, n_classes: int, spacing: tuple[float, float, float]) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance in mm for classes ``1..n_classes``.

    Surface distances use the voxel ``spacing`` (mm per axis of the arrays). A class absent from both
    maps gives NaN; absent from exactly one gives the diagonal of the image in mm (the worst possible
    distance), so that a missed organ is penalized rather than silently dropped.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {label.shape}")
    diagonal = float(np.linalg.norm(np.asarray(pred.shape) * np.asarray(spacing)))
    out = np.full(n_classes, np.nan)
    for c in range(1, n_classes + 1):
        p, g = pred == c, label == c
        if not p.any() and not g.any():
            continue
        if not p.any() or not g.any():
            out[c - 1] = diagonal
            continue
        pt = torch.as_tensor(p[None, None])
        gt = torch.as_tensor(g[None, None])
        out[c - 1] = float(compute_hausdorff_distance(pt, gt, include_background=True, percentile=95, spacing=list(spacing))[0, 0])
    return out
