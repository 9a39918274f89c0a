"""Checks of an ingested dataset before a run starts: every manifest file usable, every label value configured.

Run by ``run_training`` before the MLflow run is created, so a broken dataset costs seconds and leaves no
run behind (before, a missing label file surfaced as a 140-line MONAI traceback at the first validation,
after training; label values outside ``data.labels`` were silently trained as background).

========================  =====================================================================
check                     what is read
========================  =====================================================================
files exist, readable     the NIfTI header of every image and label of the manifest
shapes agree              header shapes: image ``(X, Y, Z)`` (a 4th axis of 1 allowed) == label's
label values configured   the label voxels (uint8 masks: one ``bincount``), against ``{0}`` and
                          the keys of ``data.labels.<modality>``
========================  =====================================================================

Label files are read in a thread pool (gzip inflation releases the GIL); a few hundred small masks take
seconds. Errors are :class:`~medmtl.errors.DataError` naming the manifest, the file(s) and what to do.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from medmtl.data.manifest import MANIFEST_NAME, ManifestEntry
from medmtl.errors import DataError

__all__ = ["check_dataset", "label_values"]

MAX_NAMED = 3  # files named in one error line


def _spatial(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    return shape[:3] if len(shape) == 4 and shape[3] == 1 else shape


def _header_shape(path: Path) -> tuple[int, ...] | str:
    """The spatial shape from the header, or why the file cannot be used."""
    if not path.is_file():
        return "missing"
    try:
        return _spatial(nib.load(str(path)).shape)
    except Exception as err:  # noqa: BLE001 - nibabel raises many kinds for a bad file; all mean "unreadable"
        return f"unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"


def label_values(path: str | os.PathLike) -> set[int]:
    """The distinct voxel values of a label NIfTI (a ``bincount`` for integer masks)."""
    arr = np.asanyarray(nib.load(str(path)).dataobj)
    if arr.dtype.kind in "ui" and arr.size and arr.min() >= 0 and arr.max() < 65536:
        return {int(v) for v in np.flatnonzero(np.bincount(arr.reshape(-1).astype(np.int64, copy=False)))}
    return {int(v) if float(v).is_integer() else float(v) for v in np.unique(arr)}


def check_dataset(data_dir: str | os.PathLike, entries: list[ManifestEntry], labels: dict[str, dict[int, str]],
                  *, workers: int | None = None) -> None:
    """Raise :class:`DataError` unless every file of ``entries`` is usable and every label value is configured.

    Args:
        data_dir: the dataset folder (manifest paths are relative to it).
        entries: the manifest's entries (all of them: a run reads every labelled one).
        labels: ``data.labels`` of the config, ``{"ct": {1: "liver", ...}, "mr": {...}}``.
        workers: threads reading files (default: up to 8).
    """
    data_dir = Path(data_dir)
    manifest = data_dir / MANIFEST_NAME
    workers = workers or min(8, (os.cpu_count() or 1) + 2)

    def headers(e: ManifestEntry) -> list[str]:
        img = _header_shape(data_dir / e.image)
        problems = [] if not isinstance(img, str) else [f"{e.image}: {img}"]
        if e.label is not None:
            lab = _header_shape(data_dir / e.label)
            if isinstance(lab, str):
                problems.append(f"{e.label}: {lab}")
            elif not isinstance(img, str) and lab != img:
                problems.append(f"{e.label}: label shape {list(lab)} differs from image {e.image} shape {list(img)}")
        return problems

    with ThreadPoolExecutor(workers) as pool:
        problems = [p for ps in pool.map(headers, entries) for p in ps]
    if problems:
        more = f" (and {len(problems) - MAX_NAMED} more)" if len(problems) > MAX_NAMED else ""
        raise DataError(f"{manifest}: {len(problems)} file problem(s): {'; '.join(problems[:MAX_NAMED])}{more}; "
                        f"re-run `medmtl ingest` into {data_dir} or remove those lines from the manifest")

    labelled = [e for e in entries if e.label is not None]
    with ThreadPoolExecutor(workers) as pool:
        found = list(pool.map(lambda e: label_values(data_dir / e.label), labelled))
    bad = []
    for e, values in zip(labelled, found):
        allowed = {0, *labels[e.modality.lower()]}
        extra = sorted(values - allowed, key=float)
        if extra:
            bad.append((e, extra, sorted(allowed - {0})))
    if bad:
        e, extra, allowed = bad[0]
        more = f" ({len(bad) - 1} more label files too)" if len(bad) > 1 else ""
        raise DataError(f"{data_dir / e.label} ({e.modality}) holds label values {', '.join(map(str, extra))} not in "
                        f"data.labels.{e.modality.lower()} ({', '.join(map(str, allowed))}){more}; fix the masks, or add "
                        "the classes to data.labels, or re-ingest with --config")
