"""Segment images with a logged or registered model: NIfTI files, DICOM series folders, folders holding several.

Start-up (imports, model URI resolution, download, file-manifest check, load) is paid once per call; each
input then costs its own reading, preprocessing, sliding window, inversion and writing. Outputs:

* one input and ``out`` ending in ``.nii``/``.nii.gz``: that file (a DICOM input also gets ``<name>.seg.dcm``);
* otherwise ``out`` is a folder, and each input gets ``<key>.nii.gz`` (+ ``<key>.seg.dcm`` for DICOM), where
  ``<key>`` is a keyed pseudonym, as ingest makes them (``OUT/.medmtl_secret``), of the series UID
  (``series-...``) or of the NIfTI file's path (``image-...``): no names, IDs or UIDs in file names, and the
  same input always gets the same name in the same folder.

Heavy packages are imported inside :func:`run_predict`, timed (``seconds["imports"]``), MONAI without the
optional packages inference never uses (:mod:`medmtl.inference.lean_imports`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from medmtl.errors import InputError, MedmtlError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class PredictedInput:
    """One input's outcome: what it was, what was written, the model's row, time per phase, or its error."""

    source: str
    output: str = ""
    seg_output: str = ""
    row: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class PredictResult:
    """Every input's outcome, and the once-per-call start-up time (``imports``, ``model_load``, ``total``)."""

    items: list[PredictedInput]
    seconds: dict[str, float]


def _jobs(inputs: list[str | Path], modality: str | None) -> list[tuple[str, str, object]]:
    """``(label, kind, what)`` per volume: kind ``nifti`` (a path) or ``dicom`` (``(folder, SeriesPlan)``)."""
    from medmtl.inference.model_io import find_dicom_series

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


def _names(jobs, out: Path) -> list[Path]:
    """Output path per job (see the module docstring); checks that ``out`` can be written."""
    if len(jobs) == 1 and out.name.endswith(NIFTI_SUFFIXES):
        out.parent.mkdir(parents=True, exist_ok=True)
        targets, folder = [out], out.parent
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


def run_predict(model_uri: str, inputs: list[str | Path], *, out: str | Path, modality: str | None = None,
                tracking_uri: str | None = None, echo=None) -> PredictResult:
    """Load ``model_uri`` once (verified, :mod:`medmtl.tracking.model_loading`) and segment every volume of ``inputs``.

    Raises :class:`~medmtl.errors.InputError` for a missing input, a NIfTI without ``modality`` or an
    unwritable ``out``, :class:`~medmtl.errors.ModelError` for a model that cannot be resolved or verified,
    both before any segmentation. A volume that fails on its own (2D, mostly NaN, unreadable) is reported
    in its :class:`PredictedInput` and the others go on. ``echo`` gets one line per volume as it is done.
    """
    t0 = time.perf_counter()
    modality = modality.upper() if modality else None
    jobs = _jobs(list(inputs), modality)
    targets = _names(jobs, Path(out).resolve())
    t_imports = time.perf_counter()
    import mlflow  # noqa: F401 - before MONAI, whose MLflow handler would import it anyway

    from medmtl.inference.lean_imports import import_monai_for_inference

    import_monai_for_inference()
    from medmtl.inference.model_io import dicom_model_input, nifti_model_input
    from medmtl.tracking.model_loading import load_verified_model
    from medmtl.tracking.store import resolve_tracking_uri

    t_load = time.perf_counter()
    model = load_verified_model(model_uri, resolve_tracking_uri(tracking_uri)[0]).unwrap_python_model()
    seconds = {"setup": t_imports - t0, "imports": t_load - t_imports, "model_load": time.perf_counter() - t_load}
    items = []
    for (label, kind, what), target in zip(jobs, targets):
        item = PredictedInput(source=label, output=str(target))
        t = time.perf_counter()
        try:
            inp = (dicom_model_input(what[1], what[0], modality, "input") if kind == "dicom"
                   else nifti_model_input(what, modality, "input"))
            read = time.perf_counter() - t
            item.seg_output = str(target.with_name(target.name.removesuffix(".gz").removesuffix(".nii") + ".seg.dcm")) if kind == "dicom" else ""
            item.row = model.segment(inp, output=item.output, seg_output=item.seg_output, where=label)
            item.seg_output = item.row["seg_output"]
            item.seconds = {"read": read, **model.last_seconds, "total": time.perf_counter() - t}
        except MedmtlError as err:
            item.error, item.output = " ".join(str(err).split()), ""
        items.append(item)
        if echo is not None:
            echo(item)
    seconds["total"] = time.perf_counter() - t0
    return PredictResult(items=items, seconds=seconds)
