"""Ingest: scanner exports and nnU-Net raw datasets in, a pseudonymized NIfTI dataset out.

This package is the patient-data boundary: it (and :mod:`medmtl.inference`, which reads a DICOM series to
segment it) are the only places that import pydicom or highdicom. What it writes (NIfTI, ``manifest.jsonl``,
``ingest_report.json``) carries no names, patient IDs, birth dates, accession numbers or source UIDs.

- :mod:`~medmtl.ingest.dicom_series`: header scan, series assembly, named checks, pixel reading
- :mod:`~medmtl.ingest.dicom_seg`: DICOM SEG objects as labels, placed in world space
- :mod:`~medmtl.ingest.nnunet_raw`: nnU-Net raw datasets
- :mod:`~medmtl.ingest.pseudonym`: keyed pseudonyms and the local secret
- :mod:`~medmtl.ingest.run`: the orchestration (:func:`ingest`), lock, resume, report
"""

from __future__ import annotations

__all__ = ["ingest", "IngestError", "IngestReport"]


def __getattr__(name: str):
    # lazy, so that inference can read a DICOM series without importing the whole ingest stage
    if name in __all__:
        from medmtl.ingest import run

        return getattr(run, name)
    raise AttributeError(f"module 'medmtl.ingest' has no attribute {name!r}")
