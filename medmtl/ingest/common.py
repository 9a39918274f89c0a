"""Small pieces every ingest reader shares, defined once: skipped files, check findings, DICOM value parsing,
functional-group lookup and the slice frame from ImageOrientationPatient.

Header-only helpers: nothing here reads pixel data or writes files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ImageOrientationPatient vectors further than this from unit length / orthogonality are not an orientation.
IOP_ORTHONORMAL_TOL = 1e-2


@dataclass(frozen=True)
class SkippedFile:
    """A file that is not part of any image series, and why (``reason`` is a short name).

    Readers return it with the absolute ``path``; ingest reports it with the path made relative to the
    export (pseudonymized where it could carry identifiers).
    """

    path: str
    reason: str
    detail: str = ""


class Findings:
    """``reject``/``warn`` bookkeeping of a series under check, for dataclasses with ``reasons``,
    ``warnings`` (lists of check names) and ``details`` (``{name: one human sentence, no PHI}``).

    A name is listed once; its detail is the last one given.
    """

    reasons: list[str]
    warnings: list[str]
    details: dict[str, str]

    def reject(self, name: str, detail: str) -> None:
        """Record a rejecting check (the series is not written)."""
        if name not in self.reasons:
            self.reasons.append(name)
        self.details[name] = detail

    def warn(self, name: str, detail: str) -> None:
        """Record a correcting or flagging check."""
        if name not in self.warnings:
            self.warnings.append(name)
        self.details[name] = detail


def as_list(v) -> list:
    """A DICOM value as a list: ``None`` -> ``[]``, a string -> ``[it]``, a multi-value -> its items."""
    if v is None:
        return []
    if isinstance(v, (str, bytes)):
        return [v]
    try:
        return list(v)
    except TypeError:
        return [v]


def floats(v, n: int | None = None) -> tuple[float, ...] | None:
    """A DICOM DS/FD value (single or multi) as floats; ``None`` when missing, malformed or not ``n`` long."""
    vals = as_list(v)
    if not vals or (n is not None and len(vals) != n):
        return None
    try:
        return tuple(float(x) for x in vals)
    except (TypeError, ValueError):
        return None


def functional_group(item, shared, sequence: str, attribute: str):
    """Value of ``attribute`` in the functional-group ``sequence`` of a per-frame ``item``, else of the
    ``shared`` functional groups (PS3.3 C.7.6.16), else ``None``."""
    for src in (item, shared):
        if src is None:
            continue
        seq = src.get(sequence)
        if seq and attribute in seq[0]:
            return seq[0][attribute].value
    return None


def slice_frame(iop) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(row_dir, col_dir, normal)`` as an exact right-handed rotation from ImageOrientationPatient, or
    ``None`` when the six values are not two orthonormal vectors (within ``IOP_ORTHONORMAL_TOL``).

    Headers store 6-8 digits, so the vectors are re-orthonormalized (Gram-Schmidt): qform needs an exact
    rotation. ``normal = row_dir x col_dir`` is the direction of ascending slice positions.
    """
    iop = np.asarray(iop, dtype=np.float64)
    u, v = iop[:3], iop[3:]
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if abs(nu - 1) > IOP_ORTHONORMAL_TOL or abs(nv - 1) > IOP_ORTHONORMAL_TOL or abs(np.dot(u, v)) > IOP_ORTHONORMAL_TOL:
        return None
    u = u / nu
    v = v - np.dot(u, v) * u
    v = v / np.linalg.norm(v)
    return u, v, np.cross(u, v)
