"""Dataset fingerprint and training plan, per modality, from an ingested dataset.

Per modality: spacing statistics (in RAS axis order, after reorientation) and a target spacing
(the median per axis; when the coarsest axis is more than 3x the finest, the coarse axis takes the
10th percentile instead of the median, as nnU-Net does, so that thick-slice outliers do not
blur the whole dataset); for CT the foreground intensity percentiles 0.5 and 99.5 with the mean and
standard deviation of foreground voxels inside that window; for MR per-image z-scoring over the body.
The result is written to ``plan.json``, logged with every run, and overridable in the config
(``preprocess.target_spacing``, ``preprocess.ct_window``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from medmtl.data.manifest import ManifestEntry, read_manifest

__all__ = ["ModalityPlan", "Plan", "compute_plan", "save_plan", "load_plan", "spacing_ras", "ANISOTROPY_RATIO"]

ANISOTROPY_RATIO = 3.0
_FG_SAMPLES_PER_IMAGE = 20000


@dataclass
class ModalityPlan:
    """What the plan says for one modality (spacings in mm, RAS axis order)."""

    n_images: int
    n_labelled: int
    median_spacing: list[float]
    target_spacing: list[float]
    median_shape_at_target: list[int]
    normalization: str  # "ct_window_zscore" or "zscore_foreground"
    intensity: dict[str, float] = field(default_factory=dict)


@dataclass
class Plan:
    """The dataset fingerprint of both modalities (``plan.json``)."""

    ct: ModalityPlan
    mr: ModalityPlan
    version: int = 1

    def for_modality(self, modality: str) -> ModalityPlan:
        """The plan of ``"ct"`` or ``"mr"``."""
        return {"ct": self.ct, "mr": self.mr}[modality]

    def to_dict(self) -> dict:
        """Plain JSON-compatible data."""
        return asdict(self)


def spacing_ras(affine: np.ndarray, zooms) -> np.ndarray:
    """Voxel spacing reordered to the RAS axes the image will have after ``Orientationd("RAS")``."""
    ornt = nib.io_orientation(affine)
    out = np.zeros(3)
    for i in range(3):
        out[int(ornt[i, 0])] = float(zooms[i])
    return out


def _target_spacing(spacings: np.ndarray) -> np.ndarray:
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    if target[worst] > ANISOTROPY_RATIO * np.min(target):
        target[worst] = np.percentile(spacings[:, worst], 10)
    return target


def _plan_modality(data_dir: Path, entries: list[ManifestEntry], modality: str) -> ModalityPlan:
    if not entries:
        raise ValueError(f"{data_dir / 'manifest.jsonl'}: no {modality.upper()} images; both modalities are needed for joint training")
    spacings, shapes_mm, fg = [], [], []
    rng = np.random.default_rng(0)
    for e in entries:
        img = nib.load(str(data_dir / e.image))
        sp = spacing_ras(img.affine, img.header.get_zooms()[:3])
        spacings.append(sp)
        shape_ras = spacing_ras(img.affine, img.shape[:3])  # same permutation applied to the shape
        shapes_mm.append(shape_ras * sp)
        if modality == "ct" and e.label is not None:
            arr = np.asarray(img.dataobj, dtype=np.float32)
            lab = np.asarray(nib.load(str(data_dir / e.label)).dataobj)
            vals = arr[lab > 0]
            if vals.size > _FG_SAMPLES_PER_IMAGE:
                vals = rng.choice(vals, _FG_SAMPLES_PER_IMAGE, replace=False)
            fg.append(vals)
    spacings_arr = np.asarray(spacings)
    target = _target_spacing(spacings_arr)
    median_shape = np.round(np.median(np.asarray(shapes_mm), axis=0) / target).astype(int)
    intensity: dict[str, float] = {}
    if modality == "ct":
        if not fg:
            raise ValueError(f"{data_dir / 'manifest.jsonl'}: no labelled CT image; the CT intensity window is planned from labelled foreground")
        allfg = np.concatenate(fg)
        lo, hi = np.percentile(allfg, [0.5, 99.5])
        clipped = np.clip(allfg, lo, hi)
        intensity = {"p00_5": float(lo), "p99_5": float(hi), "mean": float(clipped.mean()), "std": float(clipped.std())}
    return ModalityPlan(
        n_images=len(entries),
        n_labelled=sum(e.label is not None for e in entries),
        median_spacing=[float(x) for x in np.median(spacings_arr, axis=0)],
        target_spacing=[float(x) for x in target],
        median_shape_at_target=[int(x) for x in median_shape],
        normalization="ct_window_zscore" if modality == "ct" else "zscore_foreground",
        intensity=intensity,
    )


def compute_plan(data_dir: str | Path) -> Plan:
    """Fingerprint an ingested dataset (``DATA_DIR/manifest.jsonl``) and derive the plan."""
    data_dir = Path(data_dir)
    entries = read_manifest(data_dir)
    by_mod = {m: [e for e in entries if e.modality == m.upper()] for m in ("ct", "mr")}
    return Plan(ct=_plan_modality(data_dir, by_mod["ct"], "ct"), mr=_plan_modality(data_dir, by_mod["mr"], "mr"))


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write ``plan.json`` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".plan-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(plan.to_dict(), f, indent=2)
    os.replace(tmp, path)
    return path


def load_plan(path: str | Path) -> Plan:
    """Read a ``plan.json``; the error names the file when it is missing or malformed."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return Plan(ct=ModalityPlan(**raw["ct"]), mr=ModalityPlan(**raw["mr"]), version=raw.get("version", 1))
    except FileNotFoundError:
        raise FileNotFoundError(f"plan {path} not found; run `medmtl plan DATA_DIR` first") from None
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"plan {path} is malformed ({err}); delete it and run `medmtl plan DATA_DIR` again") from None
