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

import time
from dataclasses import dataclass, field
from pathlib import Path

from medmtl.errors import MedmtlError
from medmtl.inference.model_io import list_volumes, output_paths


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
    jobs = list_volumes(list(inputs), modality)
    targets = output_paths(jobs, Path(out).resolve())
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
