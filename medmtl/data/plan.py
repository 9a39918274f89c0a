"""Dataset fingerprint and training plan, per modality, from an ingested dataset (``plan.json``).

Per modality, in RAS axis order (after ``Orientationd("RAS")``):

- **Spacing.** Every image's spacing and its shape after cropping to the body; the target spacing
  follows nnU-Net v2 (``ExperimentPlanner.determine_fullres_target_spacing``): the median spacing per
  axis, except when the coarsest axis is more than 3x coarser than *each* other axis **and** has more
  than 3x fewer voxels than *each* other axis (median shapes after crop). Then that axis takes the
  10th percentile of its spacings, but never less than the largest other axis spacing (plus 1e-5), so
  that thick-slice outliers do not force the whole dataset onto a coarse grid.
- **Intensity.** CT: percentiles 0.5 and 99.5 of the foreground voxels (label > 0) of all labelled
  images, and the mean and standard deviation of those voxels *after clipping to that window*, so that
  clip-then-standardize gives the dataset's foreground mean 0 and standard deviation 1 (nnU-Net takes
  the unclipped mean and standard deviation; the two differ by the 1% of voxels outside the window).
  MR: no dataset statistics (arbitrary scanner scale): each image is z-scored over its own body.
- **Patch and batch size** from a stated memory budget (``preprocess.memory_budget_mb``), as nnU-Net
  does with its VRAM target: the patch starts with the aspect ratio of the target spacing (isotropic in
  mm) at 256^3 voxels, is clipped to the median shape and rounded up to what the network divides, then
  the axis that is largest relative to the median shape shrinks until ``min_batch_size`` patches fit;
  the leftover budget raises the batch, capped at ``max_batch_fraction`` of the modality's voxels.
  The memory estimate is :func:`activation_bytes_per_voxel` (the tensors autograd saves for the
  backward pass of one column plus head and loss, fp32) x patch voxels x batch x paths (2 when a
  sharing unit mixes activations and every batch runs through both columns). Parameters, optimizer
  state and cuDNN workspaces are not counted: leave headroom in the budget for them.

The plan is overridable in the config: :func:`resolve_plan` applies ``preprocess.target_spacing``,
``preprocess.ct_window`` and ``preprocess.patch_size`` and re-derives patch and batch size from the
fingerprint when the config's model, sharing or budget differ from the ones the plan was made for.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medmtl.config import ExperimentConfig, ModelConfig
from medmtl.atomic import atomic_write_bytes
from medmtl.data.manifest import ManifestEntry, read_manifest
from medmtl.modality import MODALITIES, dicom_modality
from medmtl.errors import DataError

__all__ = [
    "ModalityPlan", "Plan", "compute_plan", "ensure_plan", "resolve_plan", "save_plan", "load_plan", "spacing_ras", "body_mask",
    "nnunet_target_spacing", "activation_bytes_per_voxel", "choose_patch_and_batch", "ANISOTROPY_RATIO", "PLAN_VERSION",
]

PLAN_VERSION = 2
ANISOTROPY_RATIO = 3.0  # nnU-Net's ANISO_THRESHOLD
INITIAL_PATCH_VOXELS = 256**3  # nnU-Net v2's starting patch volume before shrinking to the budget
CROP_MARGIN = 2  # voxels kept around the body box, as CropForegroundd(margin=2) in the transforms
FG_SAMPLING_SEED = 1234  # nnU-Net's seed for foreground intensity sampling
BYTES_FP32 = 4


def body_mask(x: torch.Tensor | np.ndarray, modality: str) -> torch.Tensor | np.ndarray:
    """Voxels inside the body, same shape as ``x``: CT above -500 HU; MR above 10% of the 99th percentile."""
    if modality == "ct":
        return x > -500
    flat = x.reshape(-1)
    # a strided subsample keeps the quantile cheap on large volumes (torch.quantile refuses > 16M values)
    q = torch.quantile(flat.float()[:: max(1, flat.numel() // 200000)], 0.99) if isinstance(x, torch.Tensor) else np.percentile(flat, 99)
    return x > 0.1 * q


@dataclass
class ModalityPlan:
    """What the plan says for one modality (spacings in mm, shapes in voxels, RAS axis order).

    Attributes:
        n_images: images of the modality in the manifest.
        n_labelled: of which labelled (training and held-out candidates).
        spacings: per image spacing ``[sx, sy, sz]``.
        shapes_after_crop: per image shape of the body box (original spacing).
        median_spacing: median of ``spacings`` per axis.
        target_spacing: resampling spacing (nnU-Net rule, or the config's override).
        anisotropic: whether the anisotropic-axis rule changed the target spacing.
        median_shape_at_target: median shape after cropping and resampling to ``target_spacing``.
        normalization: ``"ct_window_zscore"`` or ``"zscore_foreground"``.
        intensity: CT ``p00_5``, ``p99_5``, ``mean``, ``std`` (of the clipped foreground), ``n_voxels``.
        patch_size: training and sliding-window patch in voxels.
        batch_size: patches per step that fit ``memory["budget_mb"]``.
        memory: the estimate's inputs and result: ``budget_mb``, ``bytes_per_voxel``, ``paths``,
            ``divisor``, ``min_batch_size``, ``max_batch_fraction``, ``estimate_mb``.
        overrides: config keys that replaced planned values (filled by :func:`resolve_plan`).
    """

    n_images: int
    n_labelled: int
    spacings: list[list[float]]
    shapes_after_crop: list[list[int]]
    median_spacing: list[float]
    target_spacing: list[float]
    anisotropic: bool
    median_shape_at_target: list[int]
    normalization: str
    intensity: dict[str, float] = field(default_factory=dict)
    patch_size: list[int] = field(default_factory=list)
    batch_size: int = 2
    memory: dict[str, float] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """The dataset fingerprint and derived settings of both modalities (``plan.json``)."""

    ct: ModalityPlan
    mr: ModalityPlan
    version: int = PLAN_VERSION

    def for_modality(self, modality: str) -> ModalityPlan:
        """The plan of ``"ct"`` or ``"mr"``."""
        return {"ct": self.ct, "mr": self.mr}[modality]

    def to_dict(self) -> dict:
        """Plain JSON-compatible data."""
        return asdict(self)


def _ras_permutation(affine: np.ndarray) -> np.ndarray:
    """``perm[i]`` = the RAS axis that voxel axis ``i`` becomes after reorientation."""
    return nib.io_orientation(affine)[:, 0].astype(int)


def spacing_ras(affine: np.ndarray, zooms) -> np.ndarray:
    """Per-axis values (spacing, or shape) reordered to the RAS axes the image has after ``Orientationd("RAS")``."""
    out = np.zeros(3)
    for i, axis in enumerate(_ras_permutation(affine)):
        out[axis] = float(zooms[i])
    return out


def _body_box_shape(arr: np.ndarray, modality: str) -> np.ndarray:
    """Shape (voxel axes) of the body's bounding box plus ``CROP_MARGIN``; the whole image if no body."""
    mask = body_mask(arr, modality)
    if not mask.any():
        return np.asarray(arr.shape[:3])
    shape = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = max(0, hit[0] - CROP_MARGIN), min(arr.shape[axis], hit[-1] + 1 + CROP_MARGIN)
        shape.append(hi - lo)
    return np.asarray(shape)


def nnunet_target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, bool]:
    """Target spacing by nnU-Net v2's rule (``determine_fullres_target_spacing``).

    Args:
        spacings: ``(N, 3)`` per image spacing.
        shapes: ``(N, 3)`` per image shape after cropping (same axis order).

    Returns:
        ``(target (3,), anisotropic)``; ``anisotropic`` says whether the coarse-axis rule applied.
    """
    spacings = np.asarray(spacings, dtype=np.float64)
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(np.asarray(shapes, dtype=np.float64), 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_spacings = [target[i] for i in others]
    other_sizes = [target_size[i] for i in others]
    has_aniso_spacing = target[worst] > ANISOTROPY_RATIO * max(other_spacings)
    has_aniso_voxels = target_size[worst] * ANISOTROPY_RATIO < min(other_sizes)
    if not (has_aniso_spacing and has_aniso_voxels):
        return target, False
    coarse = np.percentile(spacings[:, worst], 10)
    # never finer than the other axes: the coarse axis stays the coarse one
    if coarse < max(other_spacings):
        coarse = max(max(other_spacings), coarse) + 1e-5
    target[worst] = coarse
    return target, True


def _median_shape_at(spacings, shapes, target) -> list[int]:
    """nnU-Net's ``compute_new_shape`` per image (``round(spacing / target * shape)``), then the median."""
    new = np.round(np.asarray(spacings, float) / np.asarray(target, float) * np.asarray(shapes, float))
    return [int(x) for x in np.median(new, axis=0)]


def activation_bytes_per_voxel(model: ModelConfig, n_out: int, *, bytes_per_element: int = BYTES_FP32) -> float:
    """Bytes autograd keeps for the backward pass of one column, its head and the loss, per input voxel.

    Counted per MONAI ``Convolution`` unit (conv -> norm -> PReLU): its input plus two maps of its
    output channels (norm input and PReLU input); a ``ResidualUnit`` of ``s`` subunits keeps its input
    plus ``3s - 1`` output maps (the residual 1x1 or strided conv reuses the input). Level ``i`` has
    ``1 / 8**i`` of the voxels. Decoder stage ``i``: the transposed conv (its input plus two output
    maps) and a unit on the concatenation (``2 * channels[i]``). Head and Dice+CE loss: the head input
    plus about four maps of ``n_out`` channels (logits, softmax, one-hot target, product). Weights are
    not counted. Matches a ``saved_tensors_hooks`` count of :class:`~medmtl.models.column.Column`
    within a few percent (``tests/data/test_plan.py``).

    Args:
        model: the column's config (channels, residual units).
        n_out: head output channels (1 + classes).
        bytes_per_element: 4 for fp32 (2 is closer under bf16/fp16 autocast; 4 is the safe side).
    """
    ch = list(model.channels)
    s = model.num_res_units + 1 if model.num_res_units > 0 else 1
    f = [8.0**-i for i in range(len(ch))]

    def unit(c_in: int, f_in: float, c_out: int, f_out: float) -> float:
        return c_in * f_in + (3 * s - 1) * c_out * f_out

    elems = unit(model.in_channels, 1.0, ch[0], f[0])
    for i in range(1, len(ch)):
        elems += unit(ch[i - 1], f[i - 1], ch[i], f[i])
    for i in range(len(ch) - 1):
        elems += ch[i + 1] * f[i + 1] + 2 * ch[i] * f[i]  # transposed conv up
        elems += unit(2 * ch[i], f[i], ch[i], f[i])
    elems += ch[0] + 4 * n_out
    return elems * bytes_per_element


def choose_patch_and_batch(
    *, median_shape, spacing, n_images: int, bytes_per_voxel: float, budget_mb: float, divisor: int,
    min_batch_size: int = 2, max_batch_fraction: float = 0.05, patch_size=None,
) -> tuple[list[int], int, float]:
    """Patch size, batch size and memory estimate (MB) for one modality (see the module docstring).

    ``patch_size`` fixes the patch (a config override) and only the batch is chosen. Raises
    ``ValueError`` naming ``preprocess.memory_budget_mb`` when not even the smallest patch fits.
    """
    med = np.maximum(np.asarray(median_shape, dtype=np.float64), 1.0)
    budget = budget_mb * 2**20

    def mem(p, b: int) -> float:
        return bytes_per_voxel * float(np.prod(p, dtype=np.float64)) * b

    smallest = divisor * int(np.ceil(8 / divisor))  # the config refuses patch dimensions under 8
    if patch_size is None:
        inv = 1.0 / np.asarray(spacing, dtype=np.float64)
        initial = np.minimum(inv * (INITIAL_PATCH_VOXELS / np.prod(inv)) ** (1 / 3), med)
        patch = [max(smallest, int(np.ceil(x / divisor)) * divisor) for x in initial]
        while mem(patch, min_batch_size) > budget:
            # shrink the axis that is largest relative to the median shape (nnU-Net's choice)
            for ax in np.argsort([p / m for p, m in zip(patch, med)], kind="stable")[::-1]:
                if patch[ax] - divisor >= smallest:
                    patch[ax] -= divisor
                    break
            else:
                raise DataError(
                    f"preprocess.memory_budget_mb={budget_mb:g}: even a {patch} patch with batch {min_batch_size} needs "
                    f"{mem(patch, min_batch_size) / 2**20:.0f} MB; raise the budget or use a smaller model")
    else:
        patch = [int(p) for p in patch_size]
    batch = int(budget // mem(patch, 1))
    cap = int(round(n_images * float(np.prod(med)) * max_batch_fraction / float(np.prod(patch, dtype=np.float64))))
    batch = max(min(batch, cap), min_batch_size)
    return patch, batch, mem(patch, batch) / 2**20


def _memory_inputs(cfg: ExperimentConfig, modality: str) -> dict[str, float]:
    """What the patch and batch decision depends on, from the config (compared by :func:`resolve_plan`)."""
    pp = cfg.preprocess
    return {
        "budget_mb": float(pp.memory_budget_mb),
        "bytes_per_voxel": activation_bytes_per_voxel(cfg.model, 1 + len(cfg.data.labels[modality])),
        "paths": 2 if cfg.mixes_activations else 1,
        "divisor": 2 ** (len(cfg.model.channels) - 1),
        "min_batch_size": pp.min_batch_size,
        "max_batch_fraction": pp.max_batch_fraction,
    }


def _patch_and_batch(mp: ModalityPlan, inputs: dict[str, float], patch_size=None) -> None:
    patch, batch, est = choose_patch_and_batch(
        median_shape=mp.median_shape_at_target, spacing=mp.target_spacing, n_images=max(1, mp.n_labelled),
        bytes_per_voxel=inputs["bytes_per_voxel"] * inputs["paths"], budget_mb=inputs["budget_mb"],
        divisor=int(inputs["divisor"]), min_batch_size=int(inputs["min_batch_size"]),
        max_batch_fraction=inputs["max_batch_fraction"], patch_size=patch_size,
    )
    mp.patch_size, mp.batch_size = patch, batch
    mp.memory = {**inputs, "estimate_mb": round(est, 1)}


def _plan_modality(data_dir: Path, entries: list[ManifestEntry], modality: str, cfg: ExperimentConfig) -> ModalityPlan:
    if not entries:
        raise DataError(f"{data_dir / 'manifest.jsonl'}: no {dicom_modality(modality)} images; both modalities are needed for joint training")
    spacings, shapes, fg = [], [], []
    rng = np.random.default_rng(FG_SAMPLING_SEED)
    cap = cfg.preprocess.fg_samples_per_image
    for e in entries:
        img = nib.load(str(data_dir / e.image))
        arr = np.asarray(img.dataobj, dtype=np.float32)
        spacings.append(spacing_ras(img.affine, img.header.get_zooms()[:3]))
        shapes.append(spacing_ras(img.affine, _body_box_shape(arr, modality)))
        if modality == "ct" and e.label is not None:
            lab = np.asarray(nib.load(str(data_dir / e.label)).dataobj)
            vals = arr[lab > 0]
            if vals.size > cap:
                vals = rng.choice(vals, cap, replace=False)
            fg.append(vals)
    target, aniso = nnunet_target_spacing(np.asarray(spacings), np.asarray(shapes))
    intensity: dict[str, float] = {}
    if modality == "ct":
        if not fg or not sum(v.size for v in fg):
            raise DataError(f"{data_dir / 'manifest.jsonl'}: no labelled CT foreground; the CT intensity window is planned from labelled foreground")
        allfg = np.concatenate(fg).astype(np.float64)
        lo, hi = np.percentile(allfg, [0.5, 99.5])
        clipped = np.clip(allfg, lo, hi)
        intensity = {"p00_5": float(lo), "p99_5": float(hi), "mean": float(clipped.mean()), "std": float(clipped.std()), "n_voxels": int(allfg.size)}
    mp = ModalityPlan(
        n_images=len(entries),
        n_labelled=sum(e.label is not None for e in entries),
        spacings=[[float(x) for x in s] for s in spacings],
        shapes_after_crop=[[int(x) for x in s] for s in shapes],
        median_spacing=[float(x) for x in np.median(np.asarray(spacings), axis=0)],
        target_spacing=[float(x) for x in target],
        anisotropic=aniso,
        median_shape_at_target=_median_shape_at(spacings, shapes, target),
        normalization="ct_window_zscore" if modality == "ct" else "zscore_foreground",
        intensity=intensity,
    )
    _patch_and_batch(mp, _memory_inputs(cfg, modality))
    return mp


def compute_plan(data_dir: str | Path, cfg: ExperimentConfig | None = None) -> Plan:
    """Fingerprint an ingested dataset (``DATA_DIR/manifest.jsonl``) and derive the plan.

    ``cfg`` supplies the memory budget, the model (for the activation estimate) and the sampling cap;
    ``None`` uses the schema defaults. Config overrides are *not* applied here (see :func:`resolve_plan`).
    """
    data_dir = Path(data_dir)
    cfg = cfg if cfg is not None else ExperimentConfig()
    entries = read_manifest(data_dir)
    by_mod = {m: [e for e in entries if e.modality == dicom_modality(m)] for m in MODALITIES}
    return Plan(ct=_plan_modality(data_dir, by_mod["ct"], "ct", cfg), mr=_plan_modality(data_dir, by_mod["mr"], "mr", cfg))


def resolve_plan(plan: Plan, cfg: ExperimentConfig) -> Plan:
    """The plan as a run uses it: config overrides applied, patch and batch re-derived for ``cfg``.

    ``preprocess.target_spacing`` replaces the target spacing (and the median shape at it);
    ``preprocess.ct_window`` replaces the CT clip window (mean and std stay the planned ones);
    ``preprocess.patch_size`` fixes the patch. When the config's model, sharing or memory settings
    differ from those recorded in ``plan.memory``, patch and batch are chosen again from the
    fingerprint (no data is read). Changed keys are listed in each modality's ``overrides``.
    Returns a new :class:`Plan`; ``plan`` is not modified.
    """
    out = copy.deepcopy(plan)
    pp = cfg.preprocess
    for m in MODALITIES:
        mp = out.for_modality(m)
        rederive = False
        override = pp.target_spacing.get(m)
        if override is not None and [float(x) for x in override] != mp.target_spacing:
            mp.target_spacing = [float(x) for x in override]
            mp.median_shape_at_target = _median_shape_at(mp.spacings, mp.shapes_after_crop, mp.target_spacing)
            mp.overrides.append("preprocess.target_spacing")
            rederive = True
        if m == "ct" and pp.ct_window is not None:
            mp.intensity["p00_5"], mp.intensity["p99_5"] = float(pp.ct_window[0]), float(pp.ct_window[1])
            mp.overrides.append("preprocess.ct_window")
        inputs = _memory_inputs(cfg, m)
        if pp.patch_size is not None:
            _patch_and_batch(mp, inputs, patch_size=pp.patch_size)
            mp.overrides.append("preprocess.patch_size")
        elif rederive or any(mp.memory.get(k) != v for k, v in inputs.items()):
            _patch_and_batch(mp, inputs)
    return out


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write ``plan.json`` atomically."""
    atomic_write_bytes(path, json.dumps(plan.to_dict(), indent=2).encode())
    return Path(path)


def load_plan(path: str | Path) -> Plan:
    """Read a ``plan.json``; the error names the file when it is missing, malformed or outdated."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        if raw.get("version", 1) != PLAN_VERSION:
            raise DataError(f"plan {path} has version {raw.get('version', 1)}, this medmtl writes {PLAN_VERSION}; "
                             "run `medmtl plan DATA_DIR` again")
        return Plan(ct=ModalityPlan(**raw["ct"]), mr=ModalityPlan(**raw["mr"]), version=raw["version"])
    except FileNotFoundError:
        raise DataError(f"plan {path} not found; run `medmtl plan DATA_DIR` first") from None
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise DataError(f"plan {path} is malformed ({err}); delete it and run `medmtl plan DATA_DIR` again") from None


def ensure_plan(data_dir: str | Path, cfg: ExperimentConfig | None = None, *, recompute: bool = False) -> Path:
    """``DATA_DIR/plan.json``, computed from the manifest when missing, written by another plan version or unreadable.

    ``recompute=True`` (``medmtl plan``) writes a fresh plan whatever is there.
    """
    path = Path(data_dir) / "plan.json"
    stale = recompute or not path.exists()
    if not stale:
        try:
            stale = json.loads(path.read_text()).get("version", 1) != PLAN_VERSION
        except json.JSONDecodeError:
            stale = True
    if stale:
        save_plan(compute_plan(data_dir, cfg), path)
    return path
