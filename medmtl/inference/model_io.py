"""What the deployable model reads and writes: NIfTI files, DICOM series folders, arrays; NIfTI and DICOM SEG.

Inputs become one NIfTI file on the input's own grid, so that every kind goes through exactly the same
preprocessing, sliding-window inference and inversion as training-time evaluation:

* a NIfTI file: used as it is;
* a DICOM series folder: read with :mod:`medmtl.ingest.dicom_series` (the same header checks, slice
  ordering and geometry as ingest; read-only), written to a temporary NIfTI on the DICOM grid;
* an array ``(X, Y, Z)`` with its 4x4 RAS affine (e.g. JSON lists sent to a served model).

DICOM headers carry patient data. Nothing here logs or returns header values: errors name the folder and
the check that failed, and the returned :class:`ModelInput` keeps the DICOM datasets' paths only to write
a DICOM SEG for the user (which, as DICOM requires, references the source patient and study).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from medmtl.atomic import atomic_path
from medmtl.errors import InputError
from medmtl.modality import MODALITIES, Modality, dicom_modality, parse_modality
from medmtl.nifti import write_nifti as _write_nifti

__all__ = ["ModelInput", "InputKind", "read_model_input", "read_dicom_series", "find_dicom_series", "read_series_volume",
           "dicom_model_input", "nifti_model_input", "list_volumes", "output_paths", "write_nifti", "write_dicom_seg", "SegNotPossible", "check_volume_shape"]

#: where a model input came from
InputKind = Literal["nifti", "dicom", "array"]
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class SegNotPossible(InputError, ValueError):
    """A DICOM SEG cannot reference the source frames one to one (the message says why)."""


@dataclass
class ModelInput:
    """One input ready for the segmenter.

    Attributes:
        kind: ``nifti``, ``dicom`` or ``array``.
        modality: ``ct`` or ``mr``.
        nifti: NIfTI file on the input grid (temporary for DICOM and arrays; see :meth:`cleanup`).
        shape: input grid ``(X, Y, Z)``.
        affine: 4x4 voxel-to-RAS affine of the input grid.
        dicom_plan: the accepted :class:`~medmtl.ingest.dicom_series.SeriesPlan` for DICOM inputs.
    """

    kind: InputKind
    modality: Modality
    nifti: Path
    shape: tuple[int, int, int]
    affine: np.ndarray
    dicom_plan: object | None = None
    _tmpdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def cleanup(self) -> None:
        """Remove the temporary NIfTI, if any."""
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def _modality(value, where: str) -> Modality:
    m = parse_modality(value)
    if m is None:
        raise InputError(f"{where}: modality must be {' or '.join(map(dicom_modality, MODALITIES))}, got {value!r}")
    return m


def check_volume_shape(shape: tuple[int, ...], where: str) -> tuple[int, int, int]:
    """``(X, Y, Z)`` of a 3D volume; :class:`~medmtl.errors.InputError` for a 2D image, one slice or several volumes.

    The model is a 3D network trained on volumes: a single slice would be padded into a volume and
    segmented into something meaningless, so it is refused rather than answered.
    """
    shape = tuple(int(s) for s in shape)
    extra = shape[3:]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise InputError(f"{where}: a 2D image (shape {list(shape)}) cannot be segmented; medmtl segments 3D volumes "
                         "(give a 3D NIfTI or the folder of a whole DICOM series)")
    if extra and int(np.prod(extra)) > 1:
        raise InputError(f"{where}: holds {int(np.prod(extra))} volumes (shape {list(shape)}); give one 3D volume per input")
    return shape[:3]


def write_nifti(arr: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write ``arr`` with ``affine`` (qform and sform, code 1) atomically; returns ``path``.

    The project's one NIfTI writer (:func:`medmtl.nifti.write_nifti`): gzipped when ``path`` ends in ``.gz``.
    """
    path = Path(path)
    _write_nifti(path, arr, affine)
    return path


def find_dicom_series(folder: str | Path) -> list:
    """Accepted CT and MR image series (:class:`~medmtl.ingest.dicom_series.SeriesPlan`) found under ``folder``.

    Headers are read once (recursively, pixel data not decoded). Raises
    :class:`~medmtl.errors.InputError` naming the folder when it holds no acceptable series (with the checks
    that failed).
    """
    from medmtl.ingest.dicom_series import SkippedFile, assemble_series, check_series, quiet_pydicom, scan_file

    folder = Path(folder)
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    with quiet_pydicom():
        slices = []
        for f in files:
            res = scan_file(f)
            if not isinstance(res, SkippedFile):
                slices.extend(res)
        plans = [check_series(c) for c in assemble_series(slices)]
    accepted = [p for p in plans if p.accepted and parse_modality(p.modality) is not None]
    if not accepted:
        why = sorted({f"{r}: {p.details.get(r, '')}" for p in plans for r in p.reasons})
        raise InputError(f"{folder}: no CT or MR image series to segment ({len(files)} files"
                         + (f"; rejected: {'; '.join(why)}" if why else "") + ")")
    return accepted


def read_series_volume(plan, folder: str | Path) -> np.ndarray:
    """Decode an accepted series of :func:`find_dicom_series` into ``(X, Y, Z)`` (errors name files relative to ``folder``)."""
    from medmtl.ingest.dicom_series import quiet_pydicom, read_volume

    rel = lambda p: os.path.relpath(p, folder)  # noqa: E731 - error messages name files relative to the input
    with quiet_pydicom():
        return read_volume(plan, relpath=rel)


def read_dicom_series(folder: str | Path):
    """``(volume (X, Y, Z), plan)`` of the one CT or MR image series in ``folder`` (searched recursively).

    Raises :class:`~medmtl.errors.InputError` naming the folder when it holds no acceptable series (with
    the failed checks) or several (pass one series folder then).
    """
    accepted = find_dicom_series(folder)
    if len(accepted) > 1:
        raise InputError(f"{folder}: holds {len(accepted)} image series; pass the folder of one series")
    return read_series_volume(accepted[0], folder), accepted[0]


def dicom_model_input(plan, folder: str | Path, modality: str | None = None, where: str = "input") -> "ModelInput":
    """A :class:`ModelInput` for one accepted series of :func:`find_dicom_series` (``modality`` must match the header)."""
    m = _modality(modality or plan.modality, f"{where} ({folder})")
    if modality and m != parse_modality(plan.modality):
        raise InputError(f"{where} ({folder}): modality {modality!r} given, but the series is {plan.modality}")
    vol = read_series_volume(plan, folder)
    check_volume_shape(vol.shape, f"{where} ({folder})")
    return _from_array(vol, np.asarray(plan.affine, dtype=np.float64), "dicom", m, plan)


def read_model_input(row: dict, where: str = "input") -> ModelInput:
    """Turn one input row (``image`` path or ``array`` + ``affine``, ``modality``) into a :class:`ModelInput`."""
    image = row.get("image")
    array = row.get("array")
    if isinstance(image, str) and image:
        p = Path(image)
        if p.is_dir():
            accepted = find_dicom_series(p)
            if len(accepted) > 1:
                raise InputError(f"{where} ({p}): holds {len(accepted)} image series; pass the folder of one series")
            return dicom_model_input(accepted[0], p, row.get("modality"), where)
        return nifti_model_input(p, row.get("modality"), where)
    if array is not None and not (isinstance(array, float) and np.isnan(array)):
        try:
            vol = np.asarray(array, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise InputError(f"{where}: array must be a (X, Y, Z) volume of numbers ({err})") from None
        check_volume_shape(vol.shape, where)
        if vol.ndim != 3:
            raise InputError(f"{where}: array must have three dimensions (X, Y, Z), got shape {list(vol.shape)}")
        affine = row.get("affine")
        aff = np.eye(4) if affine is None or (isinstance(affine, float) and np.isnan(affine)) else np.asarray(affine, dtype=np.float64)
        if aff.shape != (4, 4):
            raise InputError(f"{where}: affine must be a 4x4 list of lists (voxel -> RAS mm), got shape {list(aff.shape)}")
        return _from_array(vol, aff, "array", _modality(row.get("modality"), where), None)
    raise InputError(f"{where}: give 'image' (a NIfTI file or DICOM series folder) or 'array' (+ 'affine')")


def nifti_model_input(path: str | Path, modality: str | None, where: str = "input") -> "ModelInput":
    """A :class:`ModelInput` for a 3D NIfTI file (``modality`` CT or MR is required: NIfTI headers do not say it)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{where}: image {p} not found (a NIfTI file or a DICOM series folder)")
    try:
        img = nib.load(str(p))
    except Exception as err:  # nibabel raises several types for files that are not images
        raise InputError(f"{where}: {p} is not a readable NIfTI image ({type(err).__name__}: {err})") from None
    shape = check_volume_shape(img.shape, f"{where} ({p})")
    return ModelInput("nifti", _modality(modality, f"{where} ({p})"), p, shape, np.asarray(img.affine, dtype=np.float64))


def _from_array(vol: np.ndarray, affine: np.ndarray, kind: InputKind, modality: Modality, plan) -> ModelInput:
    tmp = tempfile.TemporaryDirectory(prefix="medmtl-input-")
    path = write_nifti(np.asarray(vol), affine, Path(tmp.name) / "image.nii")
    return ModelInput(kind, modality, path, tuple(int(s) for s in vol.shape), affine, plan, tmp)


def list_volumes(inputs: list[str | Path], modality: str | None) -> list[tuple[str, str, object]]:
    """``(label, kind, what)`` per volume of ``inputs``: kind ``nifti`` (a path) or ``dicom`` (``(folder, SeriesPlan)``).

    An input is a NIfTI file, a folder of NIfTI files, or a folder holding one or several DICOM series
    (headers read once, pixels not yet). Raises :class:`~medmtl.errors.InputError` for a missing input,
    another kind of file, NIfTI without ``modality``, or a folder without an acceptable series.
    """
    jobs: list[tuple[str, str, object]] = []
    for raw in inputs:
        src = Path(raw)
        if not src.exists():
            raise InputError(f"input {src} not found (give NIfTI files, DICOM series folders or folders of either)")
        niftis = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
        if src.is_file() and not src.name.endswith(NIFTI_SUFFIXES):
            raise InputError(f"input {src} is not a NIfTI file (.nii, .nii.gz); give a DICOM series as its folder")
        if niftis:
            if modality is None:
                raise InputError(f"input {src} holds NIfTI images: give --modality CT or MR")
            jobs += [(str(p), "nifti", p) for p in niftis]
            continue
        series = find_dicom_series(src)
        for i, plan in enumerate(series, start=1):
            label = str(src) if len(series) == 1 else f"{src} (series {i} of {len(series)}, {plan.modality})"
            jobs.append((label, "dicom", (src, plan)))
    return jobs


def output_paths(jobs, out: Path) -> list[Path]:
    """Output NIfTI path per volume of :func:`list_volumes`; checks that ``out`` can be written.

    One volume and ``out`` ending in ``.nii``/``.nii.gz``: ``out`` itself. Otherwise ``out`` is a folder and
    each volume gets ``<key>.nii.gz``, ``<key>`` a keyed pseudonym (as ingest makes them, secret in
    ``out/.medmtl_secret``) of the series UID (``series-...``) or the NIfTI file's path (``image-...``): no
    names, IDs or UIDs in file names, and the same input always gets the same name in the same folder.
    """
    if len(jobs) == 1 and out.name.endswith(NIFTI_SUFFIXES):
        out.parent.mkdir(parents=True, exist_ok=True)
        targets, folder = [out], out.parent
    elif out.name.endswith(NIFTI_SUFFIXES):
        raise InputError(f"--out {out} names one file, but the inputs hold {len(jobs)} volumes: give an output folder")
    else:
        from medmtl.ingest.pseudonym import load_or_create_secret, pseudonym

        out.mkdir(parents=True, exist_ok=True)
        secret = load_or_create_secret(out)
        targets = [out / (pseudonym(secret, what[1].candidate.series_uid, "series-") if kind == "dicom"
                          else pseudonym(secret, str(Path(what).resolve()), "image-")) for _, kind, what in jobs]
        targets = [t.with_name(t.name + ".nii.gz") for t in targets]
        folder = out
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder {folder} is not writable")
    return targets


# ----------------------------------------------------------------------------------------- DICOM SEG
def _segment_code(name: str):
    from pydicom.sr.codedict import codes

    organ = name.split("_")[0].capitalize()
    return getattr(codes.SCT, organ, None) or codes.SCT.Tissue


def write_dicom_seg(labels: np.ndarray, plan, class_names: list[str], path: str | Path, *, model_version: str = "") -> Path:
    """Write a DICOM SEG (highdicom, binary, one segment per class present) for a DICOM input.

    ``labels`` holds class indices ``1..n`` (0 background) on the series grid ``(X, Y, Z)`` built by
    :func:`read_dicom_series`. The SEG references the source instances and so, as DICOM requires,
    carries their patient and study; it goes to the user, never to MLflow.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    import medmtl

    if any(s.frame is not None for s in plan.slices):
        raise SegNotPossible("the source is a multi-frame (enhanced) series; the NIfTI output is written, the SEG is not")
    if plan.inplane_shift is not None or plan.target_positions is not None:
        raise SegNotPossible("the source grid was corrected (gantry tilt or uneven spacing), so its frames do not "
                             "match the segmented grid one to one; the NIfTI output is written, the SEG is not")
    sources = [pydicom.dcmread(s.path) for s in plan.slices]
    frames = np.ascontiguousarray(np.transpose(labels, (2, 1, 0))).astype(np.uint8)  # (Z, rows, cols)
    present = [c for c in range(1, len(class_names) + 1) if (frames == c).any()]
    algo = hd.AlgorithmIdentificationSequence(name="medmtl", family=codes.cid7162.ArtificialIntelligence,
                                              version=model_version or medmtl.__version__)
    descriptions = [
        hd.seg.SegmentDescription(segment_number=i, segment_label=class_names[c - 1],
                                  segmented_property_category=codes.SCT.Organ,
                                  segmented_property_type=_segment_code(class_names[c - 1]),
                                  algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
        for i, c in enumerate(present, start=1)
    ]
    if not descriptions:
        raise SegNotPossible("the model found no structure in this series; a DICOM SEG needs at least one segment")
    remap = np.zeros(len(class_names) + 1, dtype=np.uint8)
    for i, c in enumerate(present, start=1):
        remap[c] = i
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=remap[frames], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9001, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="medmtl", manufacturer_model_name="medmtl two-column segmentation",
        software_versions=medmtl.__version__, device_serial_number="0", omit_empty_frames=False,
    )
    path = Path(path)
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return path
