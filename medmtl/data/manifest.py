"""The dataset manifest: ``DATA_DIR/manifest.jsonl``, one JSON object per ingested image.

This is the only contract between ingest and the rest of medmtl (planning, loaders, training): a reader
needs nothing but this file and the NIfTI files it points at. Paths are relative to ``DATA_DIR`` so that the
folder can be moved or mounted elsewhere. No field carries PHI: ids are keyed pseudonyms.

Example line::

    {"case_id": "case-3f2a...", "modality": "CT", "image": "images/case-3f2a..._series-9b1c....nii.gz",
     "label": "labels/case-3f2a..._series-9b1c....nii.gz", "shape": [512, 512, 120],
     "spacing": [0.78, 0.78, 2.5], "series_key": "series-9b1c...", "orientation": "LPS", "n_slices": 120,
     "content_hash": "sha256:...", "label_hash": "sha256:...", "source_hash": "...",
     "warnings": [], "label_source": "label_dir"}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Literal

from medmtl.atomic import atomic_write_bytes
from medmtl.errors import DataError

MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class ManifestEntry:
    """One ingested image (and its label, if any).

    Attributes:
        case_id: keyed pseudonym of the patient (``case-`` + 12 hex chars).
        modality: ``"CT"`` or ``"MR"``.
        image: NIfTI path relative to ``DATA_DIR``.
        label: uint8 NIfTI mask on the same grid, relative to ``DATA_DIR``; ``None`` when unlabelled.
        shape: voxel grid ``[x, y, z]``.
        spacing: voxel size in mm ``[sx, sy, sz]``.
        series_key: keyed pseudonym of the source series (with ``-N`` when one UID held several volumes).
        orientation: nibabel axis codes of the affine, e.g. ``"LPS"`` (axial, DICOM voxel order).
        n_slices: slices in the source series (may differ from ``shape[2]`` after a spacing correction).
        content_hash: ``sha256:`` of the image file bytes.
        label_hash: ``sha256:`` of the label file bytes, ``None`` when unlabelled.
        source_hash: keyed fingerprint of the source files and conversion settings (re-run detection).
        warnings: names of checks that corrected or flagged this series (see the ingest report).
        label_source: where the label came from: ``label_dir`` (a NIfTI mask passed with ``--labels``),
            ``dicom_seg`` (a DICOM SEG in the export), ``nnunet`` (``labelsTr/``); ``None`` when unlabelled.
    """

    case_id: str
    modality: Literal["CT", "MR"]
    image: str
    label: str | None
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    series_key: str
    orientation: str = ""
    n_slices: int = 0
    content_hash: str = ""
    label_hash: str | None = None
    source_hash: str = ""
    warnings: tuple[str, ...] = field(default_factory=tuple)
    label_source: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["spacing"] = list(self.spacing)
        d["warnings"] = list(self.warnings)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ManifestEntry":
        """Build from a parsed manifest line; unknown keys are ignored so newer manifests stay readable."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["shape"] = tuple(int(v) for v in kw["shape"])
        kw["spacing"] = tuple(float(v) for v in kw["spacing"])
        kw["warnings"] = tuple(kw.get("warnings") or ())
        return cls(**kw)


def read_manifest(data_dir: str | os.PathLike) -> list[ManifestEntry]:
    """Read ``data_dir/manifest.jsonl``.

    Raises:
        FileNotFoundError: no manifest; the message says to run ``medmtl ingest`` first.
        ValueError: a line is not valid JSON or misses a required key; the message gives the line number.
    """
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path} not found; create the dataset with `medmtl ingest EXPORT_DIR --out {data_dir}`."
        )
    entries = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entries.append(ManifestEntry.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(
                    f"{path}:{lineno}: not a valid manifest entry ({type(e).__name__}: {e}); "
                    "re-run `medmtl ingest` to rewrite the manifest."
                ) from e
    return entries


def write_manifest(data_dir: str | os.PathLike, entries: Iterable[ManifestEntry]) -> Path:
    """Write ``data_dir/manifest.jsonl`` atomically, entries sorted by (case_id, series_key)."""
    rows = sorted(entries, key=lambda e: (e.case_id, e.series_key))
    text = "".join(json.dumps(e.to_dict(), sort_keys=True) + "\n" for e in rows)
    path = Path(data_dir) / MANIFEST_NAME
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


