"""Segment one image with a logged or registered model: NIfTI file or DICOM series folder -> label NIfTI (+ DICOM SEG)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from medmtl.errors import InputError
from medmtl.tracking.store import resolve_tracking_uri, using_tracking_uri


@dataclass
class PredictResult:
    """The model's answer row (without the label array), the files written and the wall time in seconds."""

    table: pd.DataFrame
    written: list[str]
    seg_problem: str | None
    seconds: float


def run_predict(model_uri: str, image: str | Path, *, out: str | Path, modality: str | None = None,
                tracking_uri: str | None = None) -> PredictResult:
    """Load ``model_uri`` (``models:/...`` or ``runs:/...``) and segment ``image`` into ``out``.

    A DICOM series folder also gets a DICOM SEG beside ``out`` (``<name>.seg.dcm``); a NIfTI file needs
    ``modality`` (CT or MR). Raises :class:`~medmtl.errors.InputError` for a missing input or modality.
    """
    t0 = time.perf_counter()
    src, out = Path(image), Path(out).resolve()
    if not src.exists():
        raise InputError(f"input {src} not found (give a NIfTI file or a DICOM series folder)")
    if not src.is_dir() and modality is None:
        raise InputError(f"input {src} is a NIfTI file: give --modality CT or MR")
    row = {"image": str(src.resolve()), "modality": modality.upper() if modality else None, "output": str(out)}
    if src.is_dir():
        row["seg_output"] = str(out.with_name(out.name.removesuffix(".gz").removesuffix(".nii") + ".seg.dcm"))
    with using_tracking_uri(resolve_tracking_uri(tracking_uri)[0]):  # models:/ URIs resolve through MLflow's global URI
        model = mlflow.pyfunc.load_model(model_uri)
    res = model.predict(pd.DataFrame([row])).drop(columns=["labels"], errors="ignore")
    written = [str(p) for p in (res.loc[0, "output"], res.loc[0, "seg_output"]) if p and not str(p).startswith("not written")]
    seg = str(res.loc[0, "seg_output"])
    return PredictResult(table=res, written=written, seg_problem=seg if seg.startswith("not written") else None,
                         seconds=time.perf_counter() - t0)
