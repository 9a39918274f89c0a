"""Ingest scanner exports into a clean, pseudonymized NIfTI dataset: ``medmtl ingest EXPORT_DIR --out DATA_DIR``.

What ingest does, in order:

1. Takes an exclusive lock on ``DATA_DIR/.ingest.lock`` (``flock``; released by the kernel when the process
   ends, so a killed ingest leaves no stale lock). A second ingest into the same ``DATA_DIR`` stops at once
   with an error naming the holder's pid, instead of racing on the state and manifest files.
2. Walks ``EXPORT_DIR`` recursively (any file names, DICOMDIR or not) and reads every header without pixel
   data, in parallel, with a progress bar. The export is opened read-only and never modified.
   An nnU-Net raw dataset (``dataset.json`` beside ``imagesTr/``) is detected and read instead
   (:mod:`medmtl.ingest.nnunet_raw`); ``source=`` forces either kind.
3. Assembles series and checks them (:mod:`medmtl.ingest.dicom_series` documents every check and whether it
   rejects, corrects or warns).
4. Finds each series' label, in this order:

   * a NIfTI mask from ``LABEL_DIR`` (``<SeriesInstanceUID>.nii.gz``, or a ``labels.csv`` with the columns
     ``series_uid,label_path``), matched in world space: a mask on the same grid with axes flipped or
     permuted is reordered onto the image grid; a mask that does not match is a ``label_mismatch``
     rejection in the report, never a silent resample. Masks are compared with the output grid; for a
     gantry-tilted series that is the enlarged, tilt-corrected grid (:mod:`medmtl.ingest.dicom_series`), and
     a mask on the uncorrected (sheared) DICOM grid is accepted too and gets the same in-plane shifts
     (nearest) onto it. A mask on any other grid, such as the cropped corrected grid of ingests before the
     enlargement, is a ``label_mismatch``: it cannot label the anatomy the enlargement brought back.
   * else a DICOM SEG object in the export that references the series (:mod:`medmtl.ingest.dicom_seg`: frames
     placed by their world positions, segments mapped to label values by name or number, overlaps resolved
     by the higher segment number). **A LABEL_DIR mask wins over a SEG for the same series:** the user
     named it explicitly, and it is usually the curated one. The SEG is then not read; the series carries
     the warning ``seg_superseded`` and the SEG file is listed as skipped with that reason. Two SEGs for one
     series reject it as ``multiple_seg`` (keep one, or pass the chosen mask in LABEL_DIR). A SEG that cannot
     be placed on its series rejects the series, as a NIfTI mask does: ``label_mismatch`` (geometry),
     ``seg_unusable`` (malformed or undecodable), ``unknown_label_names`` (names only partly match). A SEG that
     references no series of the export, or only rejected ones, is listed as skipped
     (``seg_without_series``, ``seg_series_rejected``).

   ``label_source`` in the report and the manifest says where each label came from: ``label_dir``,
   ``dicom_seg`` or ``nnunet``.
5. Converts series in parallel threads (``workers``) and writes ``images/<case_id>_<series_key>.nii.gz``
   in the storage type of :func:`medmtl.ingest.dicom_series.read_stored_volume` (integers, with
   ``scl_slope``/``scl_inter`` where needed; float32 only where values need it) and ``labels/...`` as uint8,
   through :func:`medmtl.nifti.write_nifti`, atomically: temporary
   file in the same folder, fsync, ``os.replace``. gzip headers carry no name and no time, so the bytes
   are reproducible and their sha256 is the content hash.
6. Writes ``manifest.jsonl`` (see :mod:`medmtl.data.manifest`) and ``ingest_report.json`` atomically; the
   report keeps the latest results of every source ingested into ``DATA_DIR`` (:func:`merged_report`).

Re-runs and resumes: after each series is written, its manifest entry is stored in
``DATA_DIR/.ingest_state/``. A re-run skips a series whose source files (paths, sizes, mtimes), label and
conversion settings are unchanged and whose outputs still hash to the recorded content hashes; an
interrupted ingest therefore resumes where it stopped. The manifest lists every stored series, so several
exports can be ingested into one ``DATA_DIR``; a series that is rejected on a re-run loses its old outputs.

PHI: case ids and series keys are keyed pseudonyms (:mod:`medmtl.ingest.pseudonym`). Nothing written or
logged carries names, patient ids, birth dates, accession numbers or source UIDs. Paths of skipped files are
reported relative to ``EXPORT_DIR``; this assumes the PACS layout (``DICOM/PA000001/ST000001/...``) where
folder names carry no PHI. Path components that look like DICOM UIDs are replaced by pseudonyms anyway; in
nnU-Net datasets the case identifier in file names is replaced by the case pseudonym.
NIfTI headers carry only geometry (``descrip`` and ``intent_name`` stay empty).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import logging
import os
import socket
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from medmtl.ingest import nnunet_raw
from medmtl.ingest.common import Findings, SkippedFile
from medmtl.ingest.dicom_seg import SegHeader, SegPlacement, choose_part, place_seg, read_seg_header, read_seg_label
from medmtl.ingest.dicom_series import (
    LABEL_TOL_VOXELS,
    LabelError,
    SeriesPlan,
    SeriesReadError,
    assemble_series,
    check_series,
    quiet_pydicom,
    read_stored_volume,
    resample_label_like,
    scan_file,
)
from medmtl.atomic import atomic_write_bytes
from medmtl.data.manifest import ManifestEntry, write_manifest
from medmtl.errors import IngestError
from medmtl.nifti import GZIP_LEVEL, write_nifti
from medmtl.ingest.pseudonym import Pseudonymizer, load_or_create_secret

try:
    import fcntl
except ImportError:  # not POSIX: ingest runs without the DATA_DIR lock (see _data_dir_lock)
    fcntl = None

log = logging.getLogger(__name__)

__all__ = ["IngestError", "IngestReport", "LabelError", "SeriesRecord", "ingest"]

REPORT_NAME = "ingest_report.json"
STATE_DIR = ".ingest_state"
LOCK_NAME = ".ingest.lock"
# Bump when the conversion changes in a way that alters output bytes: forces a re-run to rewrite.
# 2: gantry-tilted series are written on an enlarged grid (nothing cropped), background -1024 HU.
# 3: integer storage for MR too (int16/int32, or stored integers with scl_slope/scl_inter), same values.
CONVERSION_VERSION = 3

Source = Literal["auto", "dicom", "nnunet"]


@dataclass
class SeriesRecord(Findings):
    """One series in the ingest report (no PHI: keys are pseudonyms, details are geometry and counts).

    ``status`` is ``accepted`` or ``rejected``; ``action`` says what this run did to an accepted series:
    ``written`` or ``unchanged`` (outputs already up to date). ``label_source`` is ``label_dir``,
    ``dicom_seg``, ``nnunet`` or ``None`` (unlabelled). For nnU-Net images a "series" is one channel of
    one case.
    """

    series_key: str
    case_id: str
    status: str
    modality: str
    n_slices: int
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    output: str | None = None
    label: str | None = None
    label_source: str | None = None
    shape: list[int] | None = None
    spacing: list[float] | None = None
    orientation: str | None = None
    action: str | None = None

    def reject(self, name: str, detail: str) -> None:
        """Record a rejecting check (the series is not written)."""
        self.status = "rejected"
        super().reject(name, detail)


@dataclass
class IngestReport:
    """What an ingest run accepted, rejected and skipped, written to ``DATA_DIR/ingest_report.json``.

    ``source`` is ``dicom`` (a scanner export) or ``nnunet`` (an nnU-Net raw dataset); ``source_id`` a keyed
    pseudonym of the source folder. The object holds this run's results; the file keeps every source's:
    see :func:`merged_report`.
    """

    series: list[SeriesRecord] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    source: str = "dicom"
    source_id: str = ""

    @property
    def n_accepted(self) -> int:
        """Number of accepted series (written or unchanged)."""
        return sum(r.status == "accepted" for r in self.series)

    @property
    def n_rejected(self) -> int:
        """Number of rejected series."""
        return sum(r.status == "rejected" for r in self.series)

    def to_dict(self) -> dict:
        """JSON-ready dict of the whole report."""
        return {
            "source": self.source,
            "source_id": self.source_id,
            "n_accepted": self.n_accepted,
            "n_rejected": self.n_rejected,
            "n_skipped_files": len(self.skipped),
            "series": [{**asdict(r), "source_id": self.source_id} for r in self.series],
            "skipped": [{**asdict(s), "source_id": self.source_id} for s in self.skipped],
        }

    def to_json(self) -> str:
        """The report as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def summary(self) -> str:
        """A few lines for the terminal: counts, reasons, warnings, label sources and where the full report is."""
        ok = [r for r in self.series if r.status == "accepted"]
        acts = Counter(r.action for r in ok)
        lines = [
            f"ingest: {self.n_accepted} series accepted ({acts.get('written', 0)} written, "
            f"{acts.get('unchanged', 0)} unchanged), {self.n_rejected} rejected, {len(self.skipped)} files skipped"
        ]
        for title, counter in (
            ("labels", Counter(r.label_source or "unlabelled" for r in ok)),
            ("rejected", Counter(x for r in self.series if r.status == "rejected" for x in r.reasons)),
            ("warnings", Counter(x for r in self.series for x in r.warnings)),
            ("skipped files", Counter(s.reason for s in self.skipped)),
        ):
            if counter:
                lines.append(f"  {title}: " + ", ".join(f"{k} {v}" for k, v in sorted(counter.items())))
        removed = sum("previous_output_removed" in r.details for r in self.series)
        if removed:
            lines.append(f"  previous_output_removed: {removed} series accepted by an earlier ingest and rejected now; "
                         "their old images and labels were removed from the data folder and the manifest")
        lines.append(f"  details per series and file: {REPORT_NAME} beside the data")
        return "\n".join(lines)


def merged_report(previous: dict | None, report: IngestReport) -> dict:
    """The ``ingest_report.json`` content after ``report``'s run: this run's entries plus every other source's.

    Several exports can be ingested into one DATA_DIR (the manifest holds them all), so the report keeps, per
    source, the results of its latest run: entries of ``report.source_id`` are replaced, a series ingested
    again from another source moves to it, everything else stays. Counts at the top cover all sources;
    ``sources`` gives them per source (``source_id`` is a keyed pseudonym of the source folder).
    """
    now = report.to_dict()
    keys = {r["series_key"] for r in now["series"]}
    old = previous if isinstance(previous, dict) else {}
    legacy = "sources" not in old  # written before reports kept their sources: one unnamed earlier source
    tag = lambda e: e if e.get("source_id") else {**e, "source_id": "earlier-ingest"}  # noqa: E731
    series = [tag(r) for r in old.get("series", []) if isinstance(r, dict) and r.get("series_key") not in keys
              and r.get("source_id") != report.source_id] + now["series"]
    skipped = [tag(x) for x in old.get("skipped", []) if isinstance(x, dict) and x.get("source_id") != report.source_id] + now["skipped"]
    kinds = {} if legacy else {e.get("source_id"): e.get("source") for e in old.get("sources", []) if isinstance(e, dict)}
    if legacy and (series or skipped):
        kinds["earlier-ingest"] = old.get("source")
    kinds[report.source_id] = report.source
    sources = []
    for sid, kind in kinds.items():
        mine = [r for r in series if r["source_id"] == sid]
        n_skip = sum(x["source_id"] == sid for x in skipped)
        if mine or n_skip or sid == report.source_id:
            sources.append({"source_id": sid, "source": kind, "n_accepted": sum(r.get("status") == "accepted" for r in mine),
                            "n_rejected": sum(r.get("status") == "rejected" for r in mine), "n_skipped_files": n_skip})
    return {
        "source": report.source,
        "source_id": report.source_id,
        "n_accepted": sum(r.get("status") == "accepted" for r in series),
        "n_rejected": sum(r.get("status") == "rejected" for r in series),
        "n_skipped_files": len(skipped),
        "sources": sources,
        "series": series,
        "skipped": skipped,
    }


def _read_previous_report(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s; it is rewritten with this run's results only", path.name)
        return None


def ingest(
    export_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    labels_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    min_slices: int = 3,
    source: Source = "auto",
    label_names: Mapping[str, Mapping[int, str]] | None = None,
) -> IngestReport:
    """Convert a scanner export (or an nnU-Net raw dataset) into ``out_dir``: NIfTI + manifest + report.

    Args:
        export_dir: folder tree of DICOM files as a PACS or scanner wrote it, or an nnU-Net raw dataset
            folder; read only.
        out_dir: dataset folder (``DATA_DIR``); created if missing; may already hold earlier ingests.
        labels_dir: folder of ``<SeriesInstanceUID>.nii.gz`` masks and/or a ``labels.csv``
            (``series_uid,label_path``), or the path of such a CSV file (DICOM exports only).
        workers: threads for header reading and conversion (default: a few per CPU for headers,
            one per CPU for conversion).
        progress: show tqdm progress bars on stderr.
        min_slices: series with fewer slices are rejected as ``too_few_slices``.
        source: ``auto`` (an nnU-Net dataset when ``dataset.json`` and ``imagesTr/`` are present, else a
            DICOM export), ``dicom`` or ``nnunet``.
        label_names: class names per modality, ``{"CT": {1: "liver", ...}, "MR": {...}}`` (keys in any case;
            ``data.labels`` of the config). DICOM SEG segments and nnU-Net labels are mapped to these values
            by name when all their names match; ``None`` keeps their own numbers.

    Returns:
        The :class:`IngestReport` (also written to ``out_dir/ingest_report.json``).

    Raises:
        IngestError: ``export_dir`` or ``labels_dir`` is missing, ``out_dir`` is not writable, lies inside
            the export or is being written by another ingest, or an nnU-Net ``dataset.json`` is unusable.
    """
    export = Path(export_dir).resolve()
    out = Path(out_dir).resolve()
    _check_locations(export, out, labels_dir)
    kind = _source_kind(export, source)
    if kind == "nnunet" and labels_dir is not None:
        raise IngestError(
            f"{export} is an nnU-Net raw dataset, whose labels are in labelsTr/; --labels applies to DICOM exports only."
        )
    names = {str(k).upper(): dict(v) for k, v in (label_names or {}).items()}
    configured = label_names is not None
    n_cpu = os.cpu_count() or 1
    convert_workers = workers or n_cpu

    with _data_dir_lock(out):
        pz = Pseudonymizer(load_or_create_secret(out))
        for sub in ("images", "labels", STATE_DIR):
            (out / sub).mkdir(exist_ok=True)
            _remove_stale_temp_files(out / sub)
        with quiet_pydicom():
            if kind == "nnunet":
                jobs, skipped = _nnunet_jobs(export, out, pz, names, min_slices, configured)
            else:
                jobs, skipped = _dicom_jobs(export, out, pz, labels_dir, names, workers or min(16, 4 * n_cpu), min_slices, progress)
            with ThreadPoolExecutor(convert_workers) as pool:
                futures = [pool.submit(_run_job, j, out) for j in jobs]
                try:
                    results = [f.result() for f in _progress(futures, len(jobs), "converting", "series", progress)]
                except BaseException:
                    # Fatal (disk full, interrupt): stop queued series; finished ones keep their state and
                    # are skipped when the ingest is run again.
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        report = IngestReport(series=[r for r, _ in results], skipped=skipped, source=kind,
                              source_id="source-" + pz.digest(f"source:{kind}:{export}".encode())[:12])
        write_manifest(out, _read_state(out))
        merged = merged_report(_read_previous_report(out / REPORT_NAME), report)
        atomic_write_bytes(out / REPORT_NAME, (json.dumps(merged, indent=2) + "\n").encode("utf-8"))
    log.info("%s", report.summary())
    return report


# --------------------------------------------------------------------------------------------------
# locations, lock and discovery


def _check_locations(export: Path, out: Path, labels_dir) -> None:
    if not export.is_dir():
        raise IngestError(f"export folder {export} does not exist or is not a folder; pass the folder the PACS export was copied to.")
    if out == export or export in out.parents:
        raise IngestError(f"output folder {out} lies inside the export {export}; choose a DATA_DIR outside the export, which is never modified.")
    if labels_dir is not None and not Path(labels_dir).exists():
        raise IngestError(f"label path {labels_dir} does not exist; pass the folder of <SeriesInstanceUID>.nii.gz masks or a labels CSV.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise IngestError(f"output folder {out} is not writable ({e.strerror}); choose another --out or fix its permissions.") from None


def _source_kind(export: Path, source: str) -> str:
    if source == "auto":
        return "nnunet" if nnunet_raw.is_nnunet_raw(export) else "dicom"
    if source == "nnunet" and not (export / nnunet_raw.DATASET_JSON).is_file():
        raise IngestError(f"{export / nnunet_raw.DATASET_JSON} not found; an nnU-Net raw dataset needs dataset.json beside imagesTr/.")
    if source not in ("dicom", "nnunet"):
        raise IngestError(f"source={source!r}; use 'auto', 'dicom' or 'nnunet'.")
    return source


@contextlib.contextmanager
def _data_dir_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/.ingest.lock`` for the whole ingest.

    flock (not a lock file that exists or not) because the kernel drops it when the process dies: a crashed
    ingest never blocks the next one. The file is never deleted, since deleting it would let a third
    process lock a new inode while the second still holds the old one.
    """
    if fcntl is None:
        log.warning("no flock on this platform: make sure no other ingest writes into %s at the same time", out)
        yield
        return
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise IngestError(
                f"another ingest ({holder}) is writing into {out}; wait for it to finish or choose another --out. "
                f"The lock ({path}) is released when that process ends."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _discover(export: Path) -> list[str]:
    files = []
    for root, dirs, names in os.walk(export, followlinks=False):
        dirs.sort()
        files.extend(os.path.join(root, n) for n in sorted(names))
    return files


def _progress(it, total, desc, unit, enabled):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit=unit, leave=False)


def _remove_stale_temp_files(folder: Path) -> None:
    # A killed ingest can leave .tmp-* files (never under a final name); they are ours to remove.
    for p in folder.glob(".tmp-*"):
        try:
            p.unlink()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------
# NIfTI labels


def _index_labels(labels_dir) -> dict[str, Path]:
    """Map SeriesInstanceUID -> label file, from ``<uid>.nii[.gz]`` names and ``series_uid,label_path`` CSVs."""
    root = Path(labels_dir)
    index: dict[str, Path] = {}
    csvs = [root] if root.is_file() else sorted(root.glob("*.csv"))
    if root.is_dir():
        for p in sorted(root.iterdir()):
            for ext in (".nii.gz", ".nii"):
                if p.name.endswith(ext):
                    index[p.name[: -len(ext)]] = p
    for c in csvs:
        with c.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"series_uid", "label_path"} <= set(reader.fieldnames):
                raise IngestError(f"{c}: a labels CSV needs the header `series_uid,label_path`.")
            for row in reader:
                lp = Path(row["label_path"])
                index[row["series_uid"].strip()] = lp if lp.is_absolute() else c.parent / lp
    return index


def _match_label_grid(label_path: Path, affine: np.ndarray, shape) -> tuple[np.ndarray, str | None]:
    """Orientation transform that puts the label onto (affine, shape), or a sentence saying what differs."""
    img = nib.load(str(label_path))
    lshape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
    if len(lshape) != 3:
        return None, f"label has {len(img.shape)} dimensions {tuple(img.shape)}, expected a 3D mask"
    trans = ornt_transform(io_orientation(img.affine), io_orientation(affine))
    new_aff = img.affine @ inv_ornt_aff(trans, lshape)
    new_shape = _reoriented_shape(lshape, trans)
    if new_shape != tuple(shape):
        return None, f"label grid {tuple(lshape)} (reordered {new_shape}) does not match image grid {tuple(shape)}"
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)
    world = corners @ new_aff.T
    back = world @ np.linalg.inv(affine).T
    err_vox = float(np.max(np.abs(back[:, :3] - corners[:, :3])))
    if err_vox > LABEL_TOL_VOXELS:
        err_mm = float(np.max(np.linalg.norm(world[:, :3] - corners @ affine.T[:, :3], axis=1)))
        return None, (
            f"label voxels lie up to {err_mm:.3f} mm ({err_vox:.3f} voxels) away from the image voxels "
            f"(tolerance {LABEL_TOL_VOXELS} voxel); label axes {''.join(nib.aff2axcodes(img.affine))} vs image "
            f"{''.join(nib.aff2axcodes(affine))}"
        )
    return trans, None


def _reoriented_shape(shape, trans) -> tuple[int, ...]:
    out = [0, 0, 0]
    for src_axis, (dst_axis, _flip) in enumerate(trans):
        out[int(dst_axis)] = int(shape[src_axis])
    return tuple(out)


def _assign_labels(plans_for_uid: list[SeriesPlan], label_path: Path) -> dict[int, tuple]:
    """Decide which accepted part of one UID gets the label: {plan index: (transform, on_source_grid) | error}.

    A mask matches the output grid (taken as is) or, for a gantry-tilted series, the uncorrected DICOM grid
    (``on_source_grid``: shifted onto the enlarged output grid when it is loaded).
    """
    out, errors = {}, []
    for i, plan in enumerate(plans_for_uid):
        if not plan.accepted:
            continue
        try:
            trans, why = _match_label_grid(label_path, plan.affine, plan.shape)
            if why is None:
                out[i] = (trans, False)
                continue
            if plan.source_affine is not None:
                trans, why_src = _match_label_grid(label_path, plan.source_affine, plan.source_shape)
                if why_src is None:
                    out[i] = (trans, True)
                    continue
                why = (
                    f"gantry-tilted series: the mask must lie on the tilt-corrected grid {tuple(plan.shape)} "
                    f"(enlarged so that nothing is cropped) or on the original DICOM grid {tuple(plan.source_shape)}; "
                    f"corrected grid: {why}; DICOM grid: {why_src}"
                )
            errors.append((i, why))
        except Exception as e:
            errors.append((i, f"label file cannot be read ({type(e).__name__})"))
    if not out and errors:
        # No part matched: the largest accepted part carries the error (it is the one the mask was meant for).
        i, why = max(errors, key=lambda e: len(plans_for_uid[e[0]].slices))
        out[i] = LabelError("label_mismatch", why)
    return out


def _load_label(label_path: Path, trans, on_source: bool, plan: SeriesPlan | None, key: str, *, lut: np.ndarray | None = None) -> np.ndarray:
    img = nib.load(str(label_path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    if lut is not None:
        data = nnunet_raw.apply_label_lut(data, lut, f"label for {key}")
    elif not np.all(np.isfinite(data)) or np.any(data != np.round(data)) or data.min() < 0 or data.max() > 255:
        raise LabelError("label_values", f"label for {key} holds values that are not integers in 0..255")
    data = apply_orientation(data, trans)
    if on_source:
        data = resample_label_like(plan, np.asarray(data))
    return np.asarray(data, dtype=np.uint8, order="F")


# --------------------------------------------------------------------------------------------------
# jobs: one per series (DICOM) or per case and channel (nnU-Net), converted by the same code


@dataclass
class _Job:
    record: SeriesRecord
    affine: np.ndarray | None = None
    shape: tuple[int, int, int] | None = None
    read_image: Callable[[], tuple[np.ndarray, tuple[float, float] | None]] | None = None  # (stored array, scl)
    read_label: Callable[[], np.ndarray] | None = None
    source_hash: str = ""
    previous: ManifestEntry | None = None
    # ingest with a config: {value: class name} of the modality; a label holding other values is rejected
    allowed_labels: Mapping[int, str] | None = None
    label_what: str = "label"  # how messages name the label file (pseudonymized path)


def _dicom_jobs(export: Path, out: Path, pz: Pseudonymizer, labels_dir, names, scan_workers: int, min_slices: int, progress: bool):
    relpath = lambda p: pz.safe_relpath(p, export)  # noqa: E731
    slices, segs, skipped = _scan_export(export, relpath, scan_workers, progress)
    plans = [check_series(c, min_slices=min_slices) for c in assemble_series(slices)]
    labels = _index_labels(labels_dir) if labels_dir is not None else {}
    jobs = _plan_dicom_jobs(plans, labels, segs, names, pz, out, relpath, skipped)
    return jobs, skipped


def _scan_export(export: Path, relpath, scan_workers: int, progress: bool) -> tuple[list, list[SegHeader], list[SkippedFile]]:
    """Every header of the export: ``(image slices, DICOM SEG headers, skipped files)``."""
    files = _discover(export)
    slices, skipped, seg_paths = [], [], []
    with ThreadPoolExecutor(scan_workers) as pool:
        for res in _progress(pool.map(scan_file, files), len(files), "reading headers", "file", progress):
            if isinstance(res, SkippedFile) and res.reason == "dicom_seg":
                seg_paths.append(res.path)
            elif isinstance(res, SkippedFile):
                skipped.append(_reported(res, relpath))
            else:
                slices.extend(res)
    segs = []
    for p in seg_paths:  # a handful per export: read serially
        h = read_seg_header(p)
        if isinstance(h, SkippedFile):
            skipped.append(_reported(h, relpath))
        else:
            segs.append(h)
    return slices, segs, skipped


def _reported(skip: SkippedFile, relpath) -> SkippedFile:
    """The skipped file with its path as the report shows it (relative to the export, pseudonymized)."""
    return SkippedFile(relpath(skip.path), skip.reason, skip.detail)


def _plan_dicom_jobs(plans, labels, segs: list[SegHeader], names, pz: Pseudonymizer, out: Path, relpath, skipped: list) -> list[_Job]:
    """One job per checked series part: its record, how to read its image and label, and its source hash.

    Steps: group the parts by SeriesInstanceUID, give each SEG to the series it references, then per UID
    match the LABEL_DIR mask (which wins over SEGs) and the SEGs to its parts, and list unused masks.
    """
    by_uid: dict[str, list[SeriesPlan]] = {}
    for p in plans:
        by_uid.setdefault(p.candidate.series_uid, []).append(p)
    segs_by_uid = _segs_by_series(segs, by_uid, relpath, skipped)
    previous = {e.series_key: e for e in _read_state(out)}
    jobs = []
    for uid, group in by_uid.items():
        label_path = labels.get(uid)
        matches = _assign_labels(group, label_path) if label_path is not None else {}
        seg_parts, superseded = _segs_by_part(segs_by_uid.get(uid, []), group, label_path is not None, relpath, skipped)
        for i, plan in enumerate(group):
            job = _new_series_job(plan, uid, pz, previous)
            label_items = None
            if i in matches:
                label_items = _use_label_dir(job, plan, matches[i], label_path, superseded, pz)
            if plan.accepted and seg_parts.get(i):
                label_items = _use_seg(job, plan, seg_parts[i], names, relpath) or label_items
            _finish_series_job(job, plan, pz, relpath, label_items, names)
            jobs.append(job)
    for uid, p in sorted(labels.items()):
        if uid not in by_uid:
            skipped.append(SkippedFile(
                "LABEL_DIR/" + pz.safe_relpath(p, p.parent), "label_without_series",
                "no series with this SeriesInstanceUID in the export (file name pseudonymized)",
            ))
    return jobs


def _segs_by_series(segs: list[SegHeader], by_uid: dict, relpath, skipped: list) -> dict[str, list[SegHeader]]:
    """``{SeriesInstanceUID: SEGs referencing it}``; a SEG referencing no series of the export is skipped."""
    segs_by_uid: dict[str, list[SegHeader]] = defaultdict(list)
    for seg in segs:
        hits = [u for u in dict.fromkeys(seg.referenced_series) if u in by_uid]
        if not hits:
            skipped.append(SkippedFile(relpath(seg.path), "seg_without_series", "DICOM SEG that references no series of this export"))
        for u in hits:
            segs_by_uid[u].append(seg)
    return segs_by_uid


def _segs_by_part(segs: list[SegHeader], group: list[SeriesPlan], has_label_dir: bool, relpath, skipped: list):
    """``({part index: SEGs}, superseded SEG paths)`` for the parts of one UID; a LABEL_DIR mask supersedes them all."""
    seg_parts: dict[int, list[SegHeader]] = defaultdict(list)
    superseded = []
    for seg in segs:
        if has_label_dir:
            superseded.append(relpath(seg.path))
            skipped.append(SkippedFile(relpath(seg.path), "seg_superseded",
                                       "a LABEL_DIR mask for the same series wins; this DICOM SEG was not read"))
            continue
        i = choose_part(seg, group)
        if i is None:
            skipped.append(SkippedFile(relpath(seg.path), "seg_series_rejected",
                                       "the series this DICOM SEG references was rejected (see its entry)"))
        else:
            seg_parts[i].append(seg)
    return seg_parts, superseded


def _new_series_job(plan: SeriesPlan, uid: str, pz: Pseudonymizer, previous: dict) -> _Job:
    """The job of one series part with its pseudonymous key and case id, reading the image on demand."""
    cand = plan.candidate
    key = pz.series_key(uid) + (f"-{cand.part}" if cand.n_parts > 1 else "")
    pid = plan.slices[0].patient_id
    if not pid:
        plan.warn("missing_patient_id", "PatientID empty; case id derived from the study instead")
    case = pz.case_id(pid) if pid else pz.case_id("study:" + plan.slices[0].study_uid)
    rec = SeriesRecord(series_key=key, case_id=case, status="accepted", modality=plan.modality, n_slices=len(plan.slices))
    return _Job(record=rec, previous=previous.get(key), affine=plan.affine, shape=plan.shape)


def _use_label_dir(job: _Job, plan: SeriesPlan, match, label_path: Path, superseded: list[str], pz: Pseudonymizer):
    """Label the job with its LABEL_DIR mask (or reject it on a mismatch); returns the label's hash items."""
    key = job.record.series_key
    if isinstance(match, LabelError):
        plan.reject(match.reason, f"label for {key}: {match}; fix or remove the label file (not resampled)")
        return None
    trans, on_source = match
    job.read_label = lambda lp=label_path, p=plan, t=trans, s=on_source, k=key: _load_label(lp, t, s, p, k)
    job.label_what = f"label LABEL_DIR/{pz.safe_relpath(label_path, label_path.parent)} for {key}"
    job.record.label_source = "label_dir"
    if superseded:
        plan.warn("seg_superseded", f"the LABEL_DIR mask was used; {len(superseded)} DICOM SEG object(s) "
                  f"referencing this series were not read: {', '.join(superseded)}")
    st = label_path.stat()
    return ["label_dir", pz.digest(str(label_path).encode()), st.st_size, st.st_mtime_ns]


def _use_seg(job: _Job, plan: SeriesPlan, part_segs: list[SegHeader], names, relpath):
    """Label the job with the one DICOM SEG of its part (or reject it); returns the label's hash items."""
    rec = job.record
    if len(part_segs) > 1:
        plan.reject("multiple_seg", f"{len(part_segs)} DICOM SEG objects reference this series "
                    f"({', '.join(relpath(s.path) for s in part_segs)}); keep one in the export, or pass the "
                    "chosen mask in LABEL_DIR (which wins over SEG)")
        return None
    seg = part_segs[0]
    try:
        placement = place_seg(seg, plan, names.get(plan.modality), what=relpath(seg.path))
    except LabelError as e:
        plan.reject(e.reason, f"label for {rec.series_key}: {e}")
        return None
    job.read_label = lambda p=placement, pl=plan, r=rec: _read_seg(p, pl, r, relpath)
    job.label_what = f"DICOM SEG {relpath(seg.path)} for {rec.series_key}"
    rec.label_source = "dicom_seg"
    rec.details["label_source"] = f"DICOM SEG {relpath(seg.path)}: {placement.rule}"
    if names.get(plan.modality) and not placement.by_name:
        plan.warn("labels_by_number", placement.rule)
    if seg.patient_id != plan.slices[0].patient_id:
        plan.warn("seg_patient_differs", f"DICOM SEG {relpath(seg.path)} names another PatientID than "
                  "the image; it was used because it references this series, check it belongs to it")
    return ["dicom_seg", relpath(seg.path), seg.file_size, seg.file_mtime_ns, sorted(placement.values.items())]


def _finish_series_job(job: _Job, plan: SeriesPlan, pz: Pseudonymizer, relpath, label_items, names) -> None:
    """Copy the plan's findings into the record; an accepted part gets its image reader and source hash."""
    rec = job.record
    job.allowed_labels = names.get(plan.modality)
    rec.warnings, rec.details = list(plan.warnings), {**plan.details, **rec.details}
    if not plan.accepted:
        rec.status, rec.reasons, rec.label_source = "rejected", list(plan.reasons), None
        job.read_label = None
        return
    job.read_image = lambda plan=plan: read_stored_volume(plan, relpath=relpath)
    job.source_hash = _source_hash(pz, [[relpath(s.path), s.frame, s.file_size, s.file_mtime_ns] for s in plan.slices], label_items)


def _read_seg(placement: SegPlacement, plan: SeriesPlan, rec: SeriesRecord, relpath) -> np.ndarray:
    lab, overlap = read_seg_label(placement, plan, what=relpath(placement.seg.path))
    if overlap:
        rec.warn("seg_overlap", f"{overlap} voxel(s) are marked in several segments; the higher segment number was kept")
    return lab


def _default_label_names() -> dict[str, dict[int, str]]:
    """medmtl's default classes (``data.labels`` of a config with no overrides), keyed by upper-case modality."""
    from medmtl.config import DataConfig

    return {k.upper(): dict(v) for k, v in DataConfig().labels.items()}


def _nnunet_luts(ds, export: Path, modalities, names, configured: bool) -> dict:
    """Label value tables per modality. Without a config, labels are mapped by name to the default classes:
    keeping dataset.json's numbers would silently swap organs (1 is spleen in many nnU-Net datasets, liver
    here), so a dataset whose names do not all match is refused with the mapping it needs."""
    if not configured:
        names = _default_label_names()
    luts = {}
    for modality in sorted(modalities):
        try:
            lut, rule, by_name = nnunet_raw.label_lut(ds, names.get(modality))
        except LabelError as e:
            raise IngestError(f"{export / nnunet_raw.DATASET_JSON}: key 'labels': {e}.") from None
        if not configured and not by_name:
            listing = ", ".join(f"{v}: {n}" for v, n in sorted(ds.labels.items()))
            defaults = ", ".join(f"{v}: {n}" for v, n in sorted(names.get(modality, {}).items()))
            raise IngestError(
                f"{export / nnunet_raw.DATASET_JSON}: key 'labels' names classes ({listing}) that are not medmtl's "
                f"default {modality} classes ({defaults}), and keeping their numbers could swap organs silently; "
                f"pass --config with data.labels.{modality.lower()} naming them, e.g. "
                f"data.labels.{modality.lower()}: {{{listing}}}."
            )
        luts[modality] = (lut, rule, by_name)
    return luts


def _nnunet_jobs(export: Path, out: Path, pz: Pseudonymizer, names, min_slices: int, configured: bool = True):
    try:
        ds = nnunet_raw.load_dataset(export)
    except nnunet_raw.NnunetDatasetError as e:
        raise IngestError(str(e)) from None
    images, skips = nnunet_raw.list_images(ds)
    case_id = lambda case: pz.case_id(f"nnunet:{ds.name}:{case}")  # noqa: E731
    file_id = lambda name: "file-" + pz.digest(f"nnunet:{ds.name}:{name}".encode())[:12]  # noqa: E731
    rp = lambda path: nnunet_raw.report_path(ds, path, case_id, file_id)  # noqa: E731
    skipped = [SkippedFile(rp(Path(s.path)), s.reason, s.detail) for s in skips]
    luts = _nnunet_luts(ds, export, {im.modality for im in images if im.label_path is not None}, names, configured)
    json_digest = pz.digest(ds.json_bytes)
    previous = {e.series_key: e for e in _read_state(out)}
    jobs = []
    for im in images:
        key = pz.series_key(f"nnunet:{ds.name}:{im.case}:{im.channel}")
        rec = SeriesRecord(series_key=key, case_id=case_id(im.case), status="accepted", modality=im.modality, n_slices=0)
        job = _Job(record=rec, previous=previous.get(key))
        jobs.append(job)
        try:
            job.affine, job.shape = nnunet_raw.image_geometry(im.image_path)
        except SeriesReadError as e:
            rec.reject(e.reason, f"{rp(im.image_path)}: {e}")
            continue
        rec.n_slices = job.shape[2]
        if min(job.shape) < min_slices:
            rec.reject("too_few_slices", f"{rp(im.image_path)}: shape {job.shape}; at least {min_slices} voxels per axis are needed for a volume")
            continue
        job.read_image = lambda p=im.image_path: (nnunet_raw.read_image(p), None)
        st = im.image_path.stat()
        items = [[rp(im.image_path), st.st_size, st.st_mtime_ns]]
        if im.label_path is None:
            if im.split == "Tr":
                rec.warn("missing_label", f"no labelsTr/ file for {rp(im.image_path)}; ingested unlabelled")
        else:
            try:
                trans, why = _match_label_grid(im.label_path, job.affine, job.shape)
            except Exception as e:
                trans, why = None, f"label file cannot be read ({type(e).__name__})"
            if why is not None:
                rec.reject("label_mismatch", f"label {rp(im.label_path)} for {key}: {why}; fix or remove the label (not resampled)")
                continue
            lut, rule, by_name = luts[im.modality]
            job.read_label = lambda p=im.label_path, t=trans, k=key, lut=lut: _load_label(p, t, False, None, k, lut=lut)
            job.label_what = f"label {rp(im.label_path)}"
            job.allowed_labels = names.get(im.modality) if configured else None
            rec.label_source = "nnunet"
            rec.details["label_source"] = f"nnU-Net {rp(im.label_path)}: {rule}"
            if names.get(im.modality) and not by_name:
                rec.warn("labels_by_number", rule)
            st = im.label_path.stat()
            items.append([rp(im.label_path), st.st_size, st.st_mtime_ns, lut.tolist()])
        job.source_hash = _source_hash(pz, items, ["nnunet", json_digest])
    return jobs, skipped


def _source_hash(pz: Pseudonymizer, items: list, label_items) -> str:
    blob = json.dumps([CONVERSION_VERSION, GZIP_LEVEL, items, label_items], sort_keys=True).encode()
    return pz.digest(blob)


def _run_job(job: _Job, out: Path) -> tuple[SeriesRecord, ManifestEntry | None]:
    rec, entry = _convert(job, out)
    state = out / STATE_DIR / f"{rec.series_key}.json"
    if entry is not None:
        # Written right after the series, so that an interrupted ingest resumes from here.
        atomic_write_bytes(state, json.dumps(entry.to_dict(), sort_keys=True).encode())
        prev = job.previous
        for old, new in ((prev.image, entry.image), (prev.label, entry.label)) if prev is not None else ():
            if old and old != new:  # renamed (new case id) or label removed from the source: no orphan files
                (out / old).unlink(missing_ok=True)
    elif state.exists():
        _drop_old_outputs(out, state, rec)
    return rec, entry


def _convert(job: _Job, out: Path) -> tuple[SeriesRecord, ManifestEntry | None]:
    rec = job.record
    if rec.status != "accepted":
        log.info("series %s rejected: %s", rec.series_key, ", ".join(rec.reasons))
        return rec, None
    name = f"{rec.case_id}_{rec.series_key}.nii.gz"
    image_rel = f"images/{name}"
    label_rel = f"labels/{name}" if job.read_label is not None else None
    rec.output, rec.label = image_rel, label_rel
    rec.shape = [int(v) for v in job.shape]
    rec.spacing = [round(float(v), 6) for v in np.linalg.norm(job.affine[:3, :3], axis=0)]
    rec.orientation = "".join(nib.aff2axcodes(job.affine))

    if _up_to_date(job, out, image_rel, label_rel):
        rec.action = "unchanged"
        for w in job.previous.warnings:  # e.g. seg_overlap, only known when the label was decoded
            if w not in rec.warnings:
                rec.warn(w, "recorded when this series was written (see the manifest)")
        log.info("series %s unchanged", rec.series_key)
        return rec, job.previous
    try:
        vol, scl = job.read_image()
        lab = job.read_label() if job.read_label is not None else None
        if lab is not None and job.allowed_labels is not None:
            _check_label_values(lab, job.allowed_labels, job.label_what, rec.modality)
        content_hash = write_nifti(out / image_rel, vol, job.affine, scl=scl)
        label_hash = write_nifti(out / label_rel, lab, job.affine) if lab is not None else None
    except (SeriesReadError, LabelError) as e:
        rec.reject(e.reason, str(e))
        rec.output, rec.label, rec.label_source = None, None, None
        log.info("series %s rejected: %s", rec.series_key, e.reason)
        return rec, None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            raise IngestError(
                f"cannot write into {out} ({e.strerror}); free space or fix permissions and re-run: finished series are kept."
            ) from None
        raise
    rec.action = "written"
    log.info("series %s written", rec.series_key)
    entry = ManifestEntry(
        case_id=rec.case_id,
        modality=rec.modality,
        image=image_rel,
        label=label_rel,
        shape=tuple(rec.shape),
        spacing=tuple(rec.spacing),
        series_key=rec.series_key,
        orientation=rec.orientation,
        n_slices=rec.n_slices,
        content_hash=content_hash,
        label_hash=label_hash,
        source_hash=job.source_hash,
        warnings=tuple(rec.warnings),
        label_source=rec.label_source,
    )
    return rec, entry


def _check_label_values(lab: np.ndarray, allowed: Mapping[int, str], what: str, modality: str) -> None:
    """Reject a label holding values other than background and the configured classes (``data.labels``).

    Such voxels would be trained as background without a word.
    """
    counts = np.bincount(np.asarray(lab, dtype=np.uint8).ravel(order="K"), minlength=256)
    bad = [int(v) for v in np.nonzero(counts)[0] if v != 0 and int(v) not in allowed]
    if bad:
        classes = ", ".join(f"{v} {n}" for v, n in sorted(allowed.items()))
        raise LabelError(
            "label_values",
            f"{what} holds label value(s) {bad} ({int(counts[bad].sum())} voxels) outside data.labels.{modality.lower()} "
            f"({classes}); fix the mask or add the classes to data.labels",
        )


def _up_to_date(job: _Job, out: Path, image_rel: str, label_rel: str | None) -> bool:
    prev = job.previous
    if prev is None or prev.source_hash != job.source_hash or prev.image != image_rel or prev.label != label_rel:
        return False
    if _file_sha256(out / image_rel) != prev.content_hash:
        return False
    return label_rel is None or _file_sha256(out / label_rel) == prev.label_hash


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _read_state(out: Path) -> list[ManifestEntry]:
    entries = []
    for p in sorted((out / STATE_DIR).glob("*.json")):
        try:
            entries.append(ManifestEntry.from_dict(json.loads(p.read_text(encoding="utf-8"))))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable ingest state %s; the series will be converted again", p.name)
    return entries


def _drop_old_outputs(out: Path, state: Path, rec: SeriesRecord) -> None:
    # The series was accepted by an earlier run and is rejected now: stale outputs must not stay in the
    # manifest as if they were still valid.
    try:
        old = ManifestEntry.from_dict(json.loads(state.read_text(encoding="utf-8")))
        for rel in (old.image, old.label):
            if rel:
                (out / rel).unlink(missing_ok=True)
    except (ValueError, KeyError, TypeError):
        pass
    state.unlink(missing_ok=True)
    rec.details["previous_output_removed"] = "an earlier ingest had accepted this series; its outputs were removed"
