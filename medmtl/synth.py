"""Deterministic synthetic scanner exports: DICOM series as a PACS writes them, plus NIfTI label masks.

The anatomy of each fake patient is defined once in world coordinates (patient LPS millimetres), and
every series samples it on its own grid, so CT and MR grids of any spacing or orientation see
consistent organs. The exports carry fake but realistic-looking PHI in their headers, so the ingest
step's de-identification can be tested by grepping its outputs for `SynthResult.phi_strings()`.

Layout written under ``OUT``::

    export/DICOM/PA000003/ST000000/SE000001/IM000017   one file per slice, no PHI in any path
    labels/<SeriesInstanceUID>.nii.gz                   uint8 mask on the series' own grid (RAS affine)
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medmtl.atomic import atomic_write_bytes
from medmtl.errors import InputError
from medmtl.nifti import write_nifti

LABELS: dict[int, str] = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"}

# Tissue classes of the synthetic anatomy. Organ classes are label + _ORGAN_OFFSET so that the label
# map is a single lookup away from the class map.
_AIR, _FAT, _SOFT, _BONE, _VESSEL = 0, 1, 2, 3, 4
_ORGAN_OFFSET = 4
_N_CLASSES = _ORGAN_OFFSET + len(LABELS) + 1

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_FAMILY_NAMES = (
    "ABERNATHY", "BLACKWOOD", "CALLOWAY", "DELACROIX", "ELLSWORTH", "FAIRWEATHER", "GALLOWAY",
    "HAWTHORNE", "IRONSIDE", "JESPERSEN", "KILBRIDE", "LINDQVIST", "MACALLISTER", "NORTHCOTT",
    "OKONKWO", "PEMBERTON", "QUILLFEATHER", "ROSSELLINI", "STRATHMORE", "THORNBURY", "UNDERHILL",
    "VANTONGEREN", "WHITLOCK", "YARBOROUGH", "ZABRISKIE", "ASHCOMBE", "BRIGHTWATER", "CROMARTIE",
    "DUNWOODY", "FOXWORTHY", "GRISWOLD", "HOLLINGSWORTH", "KETTERIDGE", "MONTGOMERIE",
)
_GIVEN_NAMES = {
    "F": ("ROSALIND", "PHILIPPA", "GWENDOLYN", "CORDELIA", "EVANGELINE", "HENRIETTA", "MIRABEL",
          "OTTILIE", "SERAPHINA", "WINIFRED", "BEATRIX", "CLEMENTINE", "PERPETUA", "ISOLDE"),
    "M": ("BARNABY", "CORNELIUS", "EZEKIEL", "ALISTAIR", "LEOPOLD", "THADDEUS", "PEREGRINE",
          "AUGUSTUS", "CRISPIN", "LAZARUS", "OSWALDO", "FLORIAN", "SEBASTIEN", "RODERICK"),
}
_INSTITUTIONS = (
    "SAINT BRENDAN REGIONAL HOSPITAL", "NORTHWOOD VALLEY MEDICAL CENTER",
    "HARBORVIEW LAKES CLINIC", "MERIDIAN HEIGHTS UNIVERSITY HOSPITAL",
)
_PHYSICIANS = (
    "HOLLOWAY^EDMUND^^DR", "FINNEGAN^AURELIA^^DR", "VASQUEZ-ORTIZ^MATTHIAS^^DR",
    "KARAMANLIS^THEODORA^^DR", "BLOOMQUIST^REGINALD^^DR", "ODUYA^FOLASADE^^DR",
)
_OPERATORS = ("TECHNICIAN^MARISOL", "TECHNICIAN^GUNNAR", "TECHNICIAN^PRIYANKA", "TECHNICIAN^DESMOND")
_CT_SCANNERS = (("SIEMENS", "SOMATOM Definition AS+"), ("GE MEDICAL SYSTEMS", "Revolution CT"),
                ("Philips", "iCT 256"))
_MR_SCANNERS = (("SIEMENS", "Avanto_fit", 1.5), ("GE MEDICAL SYSTEMS", "SIGNA Premier", 3.0),
                ("Philips Medical Systems", "Ingenia", 1.5))


@dataclass(frozen=True)
class FakePatient:
    """A fake patient and every identifying value written about them into DICOM headers.

    All values are invented from the seed; none belongs to a real person. ``name`` and the staff names
    are DICOM person names (``FAMILY^GIVEN[^MIDDLE[^PREFIX]]``).
    """

    name: str
    patient_id: str
    birth_date: str
    sex: str
    accession_number: str
    institution_name: str
    institution_address: str
    referring_physician: str
    operator_name: str
    study_id: str

    def phi_strings(self) -> list[str]:
        """Every identifying string written to headers for this patient, each at least 6 characters.

        Person names appear both whole (DICOM form) and as their components, so a downstream leak of
        only a family name is still caught. Short strings are left out because grepping for them
        would match by chance.
        """
        strings = [self.name, self.patient_id, self.birth_date, self.accession_number,
                   self.institution_name, self.institution_address, self.referring_physician,
                   self.operator_name, self.study_id]
        for person in (self.name, self.referring_physician, self.operator_name):
            strings.extend(part for part in person.split("^") if part)
        return sorted({s for s in strings if len(s) >= 6})


@dataclass(frozen=True)
class SynthSeries:
    """One synthesized series: where its files are, its geometry, and its label mask.

    ``affine_ras`` maps voxel indices ``(i=column, j=row, k=slice sorted along the normal)`` to RAS
    millimetres; it is the affine of the label NIfTI. ``organ_centers_lps`` gives where each organ's
    shape was centred in world LPS millimetres (before perturbation and clipping), for checks.
    """

    modality: str
    patient: FakePatient
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    dicom_dir: Path
    label_path: Path | None
    shape: tuple[int, int, int]
    affine_ras: np.ndarray
    is_localizer: bool
    oblique: bool
    organ_centers_lps: dict[int, tuple[float, float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class SynthResult:
    """Everything `synthesize_exports` wrote: the export tree, the label folder and each series."""

    root: Path
    export_dir: Path
    labels_dir: Path
    series: list[SynthSeries]

    def phi_strings(self) -> list[str]:
        """Union of `FakePatient.phi_strings` over all patients in the export."""
        return sorted({s for series in self.series for s in series.patient.phi_strings()})

    def uid_strings(self) -> list[str]:
        """Study, series and frame-of-reference UIDs of the export (source UIDs must not pass ingest)."""
        return sorted({u for s in self.series
                       for u in (s.study_uid, s.series_uid, s.frame_of_reference_uid)})


# ----------------------------------------------------------------------------------------------
# Anatomy in world coordinates


@dataclass(frozen=True)
class _Organ:
    label: int
    center: np.ndarray  # (3,) LPS mm
    semi_axes: np.ndarray  # (3,) mm, in the organ's own frame
    rotation: np.ndarray  # (3, 3) organ frame -> LPS
    freqs: np.ndarray  # (K, 3) low-frequency directions for the radius perturbation
    amps: np.ndarray  # (K,)
    phases: np.ndarray  # (K,)

    def contains(self, pts: np.ndarray) -> np.ndarray:
        """Boolean mask of points ``(N, 3)`` inside the perturbed ellipsoid."""
        inside = np.zeros(len(pts), dtype=bool)
        reach = self.semi_axes.max() * (1.0 + self.amps.sum())
        # Only points within the bounding sphere need the trigonometry: most of the volume is far away.
        near = np.flatnonzero(np.sum((pts - self.center) ** 2, axis=1) <= reach**2)
        if near.size == 0:
            return inside
        q = ((pts[near] - self.center) @ self.rotation) / self.semi_axes
        rho = np.linalg.norm(q, axis=1)
        d = q / np.maximum(rho, 1e-9)[:, None]
        radius = 1.0 + np.cos(d @ self.freqs.T + self.phases) @ self.amps
        inside[near] = rho <= radius
        return inside


@dataclass(frozen=True)
class _Anatomy:
    center_xy: np.ndarray  # body axis position (LPS x, y)
    z0: float  # cranio-caudal reference level of the abdomen
    body_axes: np.ndarray  # (a: left-right, b: anterior-posterior) semi-axes
    fat_thickness: float
    wall_thickness: float
    organs: tuple[_Organ, ...]  # in increasing priority: later organs win overlaps
    fat_waves: np.ndarray  # (K, 3) wave vectors of the visceral fat field
    fat_phases: np.ndarray
    fat_threshold: float
    spine_xy: np.ndarray
    aorta_xy: np.ndarray
    aorta_radius: float

    def classes(self, pts: np.ndarray) -> np.ndarray:
        """Tissue class (uint8) of each world point ``(N, 3)`` LPS mm."""
        x = pts[:, 0] - self.center_xy[0]
        y = pts[:, 1] - self.center_xy[1]
        a, b = self.body_axes
        out = np.full(len(pts), _AIR, dtype=np.uint8)
        body = (x / a) ** 2 + (y / b) ** 2 <= 1.0
        t = self.fat_thickness
        inner = (x / (a - t)) ** 2 + (y / (b - t)) ** 2 <= 1.0
        w = t + self.wall_thickness
        cavity = (x / (a - w)) ** 2 + (y / (b - w)) ** 2 <= 1.0
        out[body] = _FAT
        out[inner] = _SOFT
        idx = np.flatnonzero(cavity)
        # float32 is ample for a smooth field with ~40 mm wavelengths and several times faster.
        field_ = np.cos(pts[idx].astype(np.float32) @ self.fat_waves.T.astype(np.float32)
                        + self.fat_phases.astype(np.float32)).mean(axis=1)
        out[idx[field_ > self.fat_threshold]] = _FAT
        for organ in self.organs:
            out[idx[organ.contains(pts[idx])]] = organ.label + _ORGAN_OFFSET
        sx = pts[:, 0] - self.spine_xy[0]
        sy = pts[:, 1] - self.spine_xy[1]
        vertebra = (sx / 19.0) ** 2 + (sy / 16.0) ** 2 <= 1.0
        lamina = (sx / 9.0) ** 2 + ((sy - 27.0) / 11.0) ** 2 <= 1.0
        out[body & (vertebra | lamina)] = _BONE
        ax = pts[:, 0] - self.aorta_xy[0]
        ay = pts[:, 1] - self.aorta_xy[1]
        out[body & (ax**2 + ay**2 <= self.aorta_radius**2)] = _VESSEL
        return out


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix about ``axis`` by ``angle`` radians (Rodrigues)."""
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _random_rotation(rng: np.random.Generator, max_angle: float, base_z: float = 0.0) -> np.ndarray:
    """A small random rotation, optionally after a fixed turn about the cranio-caudal axis."""
    r = _rotation(np.array([0.0, 0.0, 1.0]), base_z)
    for axis in np.eye(3):
        r = _rotation(axis, rng.uniform(-max_angle, max_angle)) @ r
    return r


def _make_organ(rng: np.random.Generator, label: int, center, semi_axes, base_z: float = 0.0) -> _Organ:
    k = 5
    directions = rng.normal(size=(k, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return _Organ(
        label=label,
        center=np.asarray(center, dtype=float),
        semi_axes=np.asarray(semi_axes, dtype=float) * rng.uniform(0.9, 1.1, size=3),
        rotation=_random_rotation(rng, np.deg2rad(12), base_z),
        freqs=directions * rng.uniform(1.5, 3.5, size=(k, 1)),
        amps=rng.uniform(0.015, 0.045, size=k),
        phases=rng.uniform(0, 2 * np.pi, size=k),
    )


def _make_anatomy(rng: np.random.Generator) -> _Anatomy:
    cx, cy = rng.uniform(-8, 8, size=2)
    a, b = rng.uniform(150, 170), rng.uniform(100, 120)
    z0 = float(rng.uniform(-260.0, 40.0))
    fat, wall = rng.uniform(12, 25), rng.uniform(6, 10)
    spine = np.array([cx, cy + 0.45 * b])
    j = lambda s: rng.uniform(-s, s)  # noqa: E731 - positional jitter in mm
    # The liver lies against the right abdominal wall; placing it from the wall keeps the part cut
    # off by the wall small, whatever the body width.
    liver_x = cx - (a - fat - wall) + 0.95 * 72
    # Priority order: liver first so that kidneys and spleen keep their shape where shapes touch.
    liver = _make_organ(rng, 1, [liver_x + j(4), cy - 0.15 * b + j(5), z0 + 25 + j(5)],
                        [72, 68, 70], base_z=np.deg2rad(-10))
    spleen = _make_organ(rng, 2, [cx + 0.58 * a + j(4), cy + 0.25 * b + j(4), z0 + 45 + j(5)],
                         [24, 45, 48], base_z=np.deg2rad(35))
    kid_l = _make_organ(rng, 3, [spine[0] + 62 + j(4), spine[1] - 2 + j(4), z0 - 20 + j(5)],
                        [25, 28, 50], base_z=np.deg2rad(20))
    kid_r = _make_organ(rng, 4, [spine[0] - 62 + j(4), spine[1] - 2 + j(4), z0 - 35 + j(5)],
                        [25, 28, 50], base_z=np.deg2rad(-20))
    n_waves = 6
    waves = rng.normal(size=(n_waves, 3))
    waves /= np.linalg.norm(waves, axis=1, keepdims=True)
    waves *= (2 * np.pi / rng.uniform(35, 80, size=(n_waves, 1)))
    return _Anatomy(
        center_xy=np.array([cx, cy]), z0=z0, body_axes=np.array([a, b]),
        fat_thickness=fat, wall_thickness=wall,
        organs=(liver, spleen, kid_l, kid_r),
        fat_waves=waves, fat_phases=rng.uniform(0, 2 * np.pi, size=n_waves),
        fat_threshold=rng.uniform(0.15, 0.3),
        spine_xy=spine, aorta_xy=np.array([cx + 14.0, spine[1] - 32.0]),
        aorta_radius=rng.uniform(9, 12),
    )


def _ct_lookup(rng: np.random.Generator) -> np.ndarray:
    """Mean HU per tissue class for one patient (portal-venous phase)."""
    hu = np.zeros(_N_CLASSES)
    hu[_AIR] = -1000
    hu[_FAT] = rng.uniform(-100, -60)
    hu[_SOFT] = rng.uniform(35, 50)
    hu[_BONE] = rng.uniform(450, 650)
    hu[_VESSEL] = rng.uniform(150, 190)
    hu[_ORGAN_OFFSET + 1] = rng.uniform(92, 108)
    hu[_ORGAN_OFFSET + 2] = rng.uniform(102, 118)
    hu[_ORGAN_OFFSET + 3] = rng.uniform(155, 185)
    hu[_ORGAN_OFFSET + 4] = rng.uniform(155, 185)
    return hu


def _mr_lookup(rng: np.random.Generator) -> np.ndarray:
    """Relative T2-weighted signal per tissue class: fluid-rich spleen and kidneys bright, liver dark."""
    sig = np.zeros(_N_CLASSES)
    sig[_AIR] = 0.0
    sig[_FAT] = 0.65
    sig[_SOFT] = 0.22
    sig[_BONE] = 0.35
    sig[_VESSEL] = 0.05  # flow void
    sig[_ORGAN_OFFSET + 1] = 0.28
    sig[_ORGAN_OFFSET + 2] = 0.72
    sig[_ORGAN_OFFSET + 3] = 0.85
    sig[_ORGAN_OFFSET + 4] = 0.85
    sig[1:] *= rng.uniform(0.92, 1.08, size=_N_CLASSES - 1)
    return sig


def _class_to_label() -> np.ndarray:
    lut = np.zeros(_N_CLASSES, dtype=np.uint8)
    for label in LABELS:
        lut[label + _ORGAN_OFFSET] = label
    return lut


# ----------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class _Grid:
    """A DICOM image grid with header values already rounded to what the headers hold."""

    row_dir: np.ndarray  # ImageOrientationPatient[:3]: direction of increasing column index
    col_dir: np.ndarray  # ImageOrientationPatient[3:]: direction of increasing row index
    pixel_spacing: tuple[float, float]  # DICOM order: (between rows, between columns)
    slice_spacing: float
    columns: int
    rows: int
    positions: np.ndarray  # (slices, 3) ImagePositionPatient, sorted along the normal

    @property
    def normal(self) -> np.ndarray:
        """Slice normal, cross(row_dir, col_dir): the direction slices are sorted along."""
        return np.cross(self.row_dir, self.col_dir)

    def affine_lps(self) -> np.ndarray:
        """4x4 voxel (i=column, j=row, k=slice) -> LPS mm."""
        aff = np.eye(4)
        aff[:3, 0] = self.row_dir * self.pixel_spacing[1]
        aff[:3, 1] = self.col_dir * self.pixel_spacing[0]
        aff[:3, 2] = self.normal * self.slice_spacing
        aff[:3, 3] = self.positions[0]
        return aff

    def world_points(self) -> np.ndarray:
        """LPS coordinates of every voxel centre, ``(columns * rows * slices, 3)`` in (i, j, k) C order."""
        aff = self.affine_lps()
        # Broadcast sums instead of an (N, 3) @ (3, 3) product: several times faster on CPU.
        pts = (aff[:3, 3]
               + np.arange(self.columns)[:, None, None, None] * aff[:3, 0]
               + np.arange(self.rows)[None, :, None, None] * aff[:3, 1]
               + np.arange(len(self.positions))[None, None, :, None] * aff[:3, 2])
        return pts.reshape(-1, 3)


def _make_grid(center, rotation: np.ndarray, spacing_in_plane: float, slice_spacing: float,
               columns: int, rows: int, slices: int) -> _Grid:
    """Grid centred on ``center`` whose row/column/normal directions are the columns of ``rotation``."""
    row_dir = np.round(rotation[:, 0], 6) + 0.0  # +0.0 turns -0.0 into 0.0 in the headers
    col_dir = np.round(rotation[:, 1], 6) + 0.0
    ps = round(float(spacing_in_plane), 4)
    normal = np.cross(row_dir, col_dir)
    first = (np.asarray(center, dtype=float) - (columns - 1) / 2 * ps * row_dir
             - (rows - 1) / 2 * ps * col_dir - (slices - 1) / 2 * slice_spacing * normal)
    first = np.round(first, 4)
    positions = np.round(first + np.arange(slices)[:, None] * slice_spacing * normal, 4) + 0.0
    return _Grid(row_dir, col_dir, (ps, ps), float(slice_spacing), columns, rows, positions)


# ----------------------------------------------------------------------------------------------
# Fake PHI and headers


def _make_patients(rng: np.random.Generator, n: int) -> list[FakePatient]:
    """``n`` distinct fake patients (names, ids and accession numbers never repeat in one export)."""
    patients: list[FakePatient] = []
    names: set[str] = set()
    ids: set[str] = set()
    while len(patients) < n:
        sex = "F" if rng.random() < 0.5 else "M"
        family = str(rng.choice(_FAMILY_NAMES))
        given = str(rng.choice(_GIVEN_NAMES[sex]))
        middle = str(rng.choice(list("ABCDEFGHJKLMNPRSTW")))
        name = f"{family}^{given}^{middle}"
        pid = f"MRN{rng.integers(0, 10**7):07d}"
        acc = f"ACC{rng.integers(2022, 2025)}{rng.integers(0, 10**6):06d}"
        if f"{family}^{given}" in names or pid in ids or acc in ids:
            continue
        names.add(f"{family}^{given}")
        ids.update((pid, acc))
        birth = date(1938, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 60)))
        inst = int(rng.integers(len(_INSTITUTIONS)))
        patients.append(FakePatient(
            name=name, patient_id=pid, birth_date=birth.strftime("%Y%m%d"), sex=sex,
            accession_number=acc, institution_name=_INSTITUTIONS[inst],
            institution_address=f"{100 + 37 * inst} ELMSTEAD AVENUE, FAKETON",
            referring_physician=str(rng.choice(_PHYSICIANS)),
            operator_name=str(rng.choice(_OPERATORS)),
            study_id=f"STU{rng.integers(0, 10**6):06d}",
        ))
    return patients


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["medmtl-synth", str(seed), *map(str, parts)]))


def _ds_list(values) -> list[str]:
    """Decimal strings that round-trip exactly to the floats used for the labels' geometry."""
    return [repr(float(v)) for v in values]


def _age(birth: str, on: date) -> str:
    b = date(int(birth[:4]), int(birth[4:6]), int(birth[6:]))
    years = on.year - b.year - ((on.month, on.day) < (b.month, b.day))
    return f"{years:03d}Y"


def _patient_header(p: FakePatient, study_date: date, study_time: str, study_uid: str,
                    description: str) -> dict[str, Any]:
    return {
        "SpecificCharacterSet": "ISO_IR 100",
        "PatientName": p.name,
        "PatientID": p.patient_id,
        "IssuerOfPatientID": "FAKETON_HIS",
        "PatientBirthDate": p.birth_date,
        "PatientSex": p.sex,
        "PatientAge": _age(p.birth_date, study_date),
        "StudyInstanceUID": study_uid,
        "StudyDate": study_date.strftime("%Y%m%d"),
        "StudyTime": study_time,
        "AccessionNumber": p.accession_number,
        "StudyID": p.study_id,
        "StudyDescription": description,
        "ReferringPhysicianName": p.referring_physician,
        "InstitutionName": p.institution_name,
        "InstitutionAddress": p.institution_address,
        "OperatorsName": p.operator_name,
        "BodyPartExamined": "ABDOMEN",
    }


def _time_str(base_seconds: int) -> str:
    s = base_seconds % 86400
    return f"{s // 3600:02d}{s // 60 % 60:02d}{s % 60:02d}.000000"


def _series_datasets(header: dict[str, Any], grid: _Grid, instance_numbers: np.ndarray,
                     sop_uids: list[str], volume: np.ndarray, sop_class: str) -> list[Dataset]:
    """One dataset with file meta per slice; ``volume`` is ``(columns, rows, slices)``."""
    base = Dataset()
    base.SOPClassUID = sop_class
    for keyword, value in header.items():
        setattr(base, keyword, value)
    base.ImageOrientationPatient = _ds_list([*grid.row_dir, *grid.col_dir])
    base.PixelSpacing = _ds_list(grid.pixel_spacing)
    base.Rows, base.Columns = grid.rows, grid.columns
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.BitsAllocated, base.BitsStored, base.HighBit = 16, 16, 15
    datasets = []
    for k, sop_uid in enumerate(sop_uids):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        # Shares the series-wide elements; only elements absent from `base` are set below, so no
        # shared element is ever modified.
        ds.update(base)
        ds.file_meta = meta
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImagePositionPatient = _ds_list(grid.positions[k])
        ds.SliceLocation = repr(round(float(grid.positions[k] @ grid.normal), 4) + 0.0)
        ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(volume[:, :, k].T).tobytes())
        datasets.append(ds)
    return datasets


def _dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _write_series(series_dir: Path, datasets: list[Dataset], rng: np.random.Generator,
                  suffix: str) -> None:
    """Write slices under file names shuffled against both position and InstanceNumber."""
    series_dir.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(len(datasets))
    for file_index, slice_index in enumerate(order):
        atomic_write_bytes(series_dir / f"IM{file_index:06d}{suffix}", _dicom_bytes(datasets[slice_index]), durable=False)


def _instance_numbers(n: int, mode: str) -> np.ndarray:
    """InstanceNumber of each slice (sorted along the normal) as scanners assign them.

    ``descending``: head-first numbering from the top slice; ``interleaved``: odd slices acquired first,
    as in interleaved multi-slice MR, so numbers are not monotonic with position.
    """
    if mode == "ascending":
        return np.arange(1, n + 1)
    if mode == "descending":
        return np.arange(n, 0, -1)
    acquisition = np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])
    numbers = np.empty(n, dtype=int)
    numbers[acquisition] = np.arange(1, n + 1)
    return numbers


def _write_label(path: Path, labels: np.ndarray, affine_ras: np.ndarray) -> None:
    # The shared writer's gzip has mtime 0 and no file name: the same seed gives byte-identical files.
    write_nifti(path, labels.astype(np.uint8), affine_ras, durable=False)


# ----------------------------------------------------------------------------------------------
# Series


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


_MODALITY_KEY = {"CT": 1, "MR": 2}


def _ct_study(out: Path, seed: int, index: int, patient: FakePatient, folder: Path, matrix: int,
              study_date: date) -> list[SynthSeries]:
    """Write one CT study (localizer + axial portal-venous series) and the axial series' label."""
    key = _MODALITY_KEY["CT"]
    anat = _make_anatomy(_rng(seed, key, index, 0))
    rng = _rng(seed, key, index, 1)
    hu_table = _ct_lookup(rng)
    manufacturer, model = _CT_SCANNERS[int(rng.integers(len(_CT_SCANNERS)))]
    study_uid = _uid(seed, "CT", index, "study")
    for_uid = _uid(seed, "CT", index, "frame")
    start = int(rng.integers(7 * 3600, 18 * 3600))
    patient_hdr = _patient_header(patient, study_date, _time_str(start), study_uid,
                                  "CT ABDOMEN W CONTRAST")
    common = {
        **patient_hdr,
        "Modality": "CT", "Manufacturer": manufacturer, "ManufacturerModelName": model,
        "StationName": f"CTSTATION{index % 3 + 1:02d}", "SoftwareVersions": "VA40",
        "DeviceSerialNumber": f"{70000 + index % 3}",
        "FrameOfReferenceUID": for_uid, "PositionReferenceIndicator": "",
        "PatientPosition": "FFS" if index % 2 else "HFS",
        "KVP": "120", "RescaleIntercept": "-1024", "RescaleSlope": "1", "RescaleType": "HU",
        "PixelRepresentation": 1, "WindowCenter": "40", "WindowWidth": "400",
    }
    requested = Dataset()
    requested.RequestedProcedureID = patient.accession_number
    requested.ScheduledProcedureStepID = f"SPS{patient.accession_number[3:]}"
    common["RequestAttributesSequence"] = Sequence([requested])
    suffix = ".DCM" if index % 5 == 3 else ""
    results = []

    # Localizer: one coronal projection-like image over a longer z range than the axial scan.
    scan_center = np.array([*anat.center_xy, anat.z0 + rng.uniform(-10, 10)])
    loc_rot = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # columns: row, col, normal dirs
    loc_grid = _make_grid(scan_center, loc_rot, 5.0, 1.0, matrix, matrix, 1)
    depth = np.linspace(-anat.body_axes[1], anat.body_axes[1], 33)
    pts = loc_grid.world_points()
    hu_sum = np.zeros(len(pts))
    for dy in depth:
        hu_sum += hu_table[anat.classes(pts + np.array([0.0, dy, 0.0]))]
    hu = hu_sum / len(depth) + rng.normal(0, 10, size=len(pts))
    stored = np.clip(np.round(hu + 1024), 0, 4095).astype("<i2").reshape(matrix, matrix)
    loc_uid = _uid(seed, "CT", index, "series", 0)
    loc_hdr = {**common, "SeriesInstanceUID": loc_uid, "SeriesNumber": 1,
               "SeriesDescription": "Topogram 0.6 T20s", "ProtocolName": "Abdomen_PV",
               "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "SliceThickness": "1",
               "SeriesDate": study_date.strftime("%Y%m%d"), "SeriesTime": _time_str(start + 30),
               "AcquisitionNumber": 1, "ContentTime": _time_str(start + 30)}
    datasets = _series_datasets(loc_hdr, loc_grid, np.array([1]), [_uid(seed, "CT", index, "sop", 0, 0)],
                                stored[:, :, None], CTImageStorage)
    loc_dir = folder / "SE000000"
    _write_series(loc_dir, datasets, rng, suffix)
    results.append(SynthSeries(
        modality="CT", patient=patient, study_uid=study_uid, series_uid=loc_uid,
        frame_of_reference_uid=for_uid, dicom_dir=loc_dir, label_path=None,
        shape=(matrix, matrix, 1), affine_ras=_LPS_TO_RAS @ loc_grid.affine_lps(),
        is_localizer=True, oblique=False, organ_centers_lps=_centers(anat),
    ))

    # Axial portal-venous series.
    px = rng.uniform(3.6, 4.2)
    dz = 5.0 if px >= 3.9 else float(rng.choice([4.0, 5.0]))
    n_slices = int(np.clip(round(rng.uniform(200, 240) / dz), 40, 55))
    grid = _make_grid(scan_center, np.eye(3), px, dz, matrix, matrix, n_slices)
    classes = anat.classes(grid.world_points())
    hu = hu_table[classes] + rng.normal(0, rng.uniform(15, 25), size=classes.size)
    vol = np.clip(np.round(hu + 1024), 0, 4095).astype("<i2").reshape(matrix, matrix, n_slices)
    labels = _class_to_label()[classes].reshape(matrix, matrix, n_slices)
    series_uid = _uid(seed, "CT", index, "series", 1)
    thickness = dz + float(rng.choice([0.0, 0.0, 1.0, -0.5]))
    hdr = {**common, "SeriesInstanceUID": series_uid, "SeriesNumber": 2,
           "SeriesDescription": f"ABD PV {thickness:.1f} Br40", "ProtocolName": "Abdomen_PV",
           "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "SliceThickness": repr(thickness),
           "ConvolutionKernel": "Br40", "SeriesDate": study_date.strftime("%Y%m%d"),
           "SeriesTime": _time_str(start + 95), "AcquisitionNumber": 2,
           "ContentTime": _time_str(start + 95)}
    numbers = _instance_numbers(n_slices, "descending" if index % 2 == 0 else "ascending")
    sop_uids = [_uid(seed, "CT", index, "sop", 1, k) for k in range(n_slices)]
    datasets = _series_datasets(hdr, grid, numbers, sop_uids, vol, CTImageStorage)
    series_dir = folder / "SE000001"
    _write_series(series_dir, datasets, rng, suffix)
    affine_ras = _LPS_TO_RAS @ grid.affine_lps()
    label_path = out / "labels" / f"{series_uid}.nii.gz"
    _write_label(label_path, labels, affine_ras)
    results.append(SynthSeries(
        modality="CT", patient=patient, study_uid=study_uid, series_uid=series_uid,
        frame_of_reference_uid=for_uid, dicom_dir=series_dir, label_path=label_path,
        shape=(matrix, matrix, n_slices), affine_ras=affine_ras, is_localizer=False, oblique=False,
        organ_centers_lps=_centers(anat),
    ))
    return results


def _mr_study(out: Path, seed: int, index: int, patient: FakePatient, folder: Path, matrix: int,
              study_date: date, relatedness: float = 1.0, labelled: bool = True) -> list[SynthSeries]:
    """Write one MR study (a T2-weighted series, every third one oblique) and its label (when ``labelled``)."""
    key = _MODALITY_KEY["MR"]
    anat = _related_anatomy(_make_anatomy(_rng(seed, key, index, 0)), relatedness, _rng(seed, key, index, 2))
    rng = _rng(seed, key, index, 1)
    signal_table = _mr_lookup(rng)
    manufacturer, model, field_t = _MR_SCANNERS[int(rng.integers(len(_MR_SCANNERS)))]
    study_uid = _uid(seed, "MR", index, "study")
    for_uid = _uid(seed, "MR", index, "frame")
    series_uid = _uid(seed, "MR", index, "series", 0)
    start = int(rng.integers(7 * 3600, 18 * 3600))

    oblique = index % 3 == 2
    rotation = np.eye(3)
    if oblique:
        # Tilt about an in-plane axis, as a technologist angling the stack along the kidneys would.
        phi = rng.uniform(0, np.pi)
        axis = np.array([np.cos(phi), np.sin(phi), 0.0])
        angle = np.deg2rad(rng.uniform(10, 20)) * rng.choice([-1.0, 1.0])
        rotation = _rotation(axis, angle)
    px = rng.uniform(4.2, 5.0)
    dz = 6.0
    n_slices = int(round(rng.uniform(200, 240) / dz))
    center = np.array([*anat.center_xy, anat.z0 + rng.uniform(-10, 10)])
    grid = _make_grid(center, rotation, px, dz, matrix, matrix, n_slices)
    pts = grid.world_points()
    classes = anat.classes(pts)

    scale = rng.uniform(200, 3000)
    p = (pts - center) / 150.0
    lin = rng.normal(0, 0.4, size=3)
    quad = rng.normal(0, 0.25, size=(3, 3))
    bias = 1.0 + 0.3 * np.tanh(p @ lin + np.einsum("ni,ij,nj->n", p, quad, p))
    clean = scale * signal_table[classes] * bias
    sigma = scale * rng.uniform(0.02, 0.04)
    real = clean + rng.normal(0, sigma, size=clean.size)
    imag = rng.normal(0, sigma, size=clean.size)
    magnitude = np.hypot(real, imag)  # Rician: magnitude of signal plus complex Gaussian noise
    vol = np.clip(np.round(magnitude), 0, 65535).astype("<u2").reshape(matrix, matrix, n_slices)
    labels = _class_to_label()[classes].reshape(matrix, matrix, n_slices)

    patient_hdr = _patient_header(patient, study_date, _time_str(start), study_uid, "MR ABDOMEN")
    hdr = {
        **patient_hdr,
        "Modality": "MR", "Manufacturer": manufacturer, "ManufacturerModelName": model,
        "StationName": f"MRSTATION{index % 2 + 1:02d}", "SoftwareVersions": "syngo MR E11",
        "MagneticFieldStrength": repr(field_t), "ImagingFrequency": repr(round(42.577 * field_t, 4)),
        "ImagedNucleus": "1H", "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"],
        "ScanOptions": "PFP", "MRAcquisitionType": "2D", "SequenceName": "*tse2d1_21",
        "RepetitionTime": repr(round(float(rng.uniform(3000, 5500)), 1)),
        "EchoTime": repr(round(float(rng.uniform(85, 110)), 1)), "EchoTrainLength": 21,
        "FlipAngle": "150", "NumberOfAverages": "1", "PixelBandwidth": "260",
        "FrameOfReferenceUID": for_uid, "PositionReferenceIndicator": "",
        "PatientPosition": "HFS", "SeriesInstanceUID": series_uid, "SeriesNumber": 3 + index % 4,
        "SeriesDescription": "t2_tse_tra_obl" if oblique else "t2_tse_tra",
        "ProtocolName": "t2_tse_tra", "ImageType": ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"],
        "SliceThickness": "5.0", "SpacingBetweenSlices": repr(dz),
        "SeriesDate": study_date.strftime("%Y%m%d"), "SeriesTime": _time_str(start + 400),
        "AcquisitionNumber": 1, "ContentTime": _time_str(start + 400),
        "PixelRepresentation": 0,
        "WindowCenter": repr(round(scale * 0.5, 1)), "WindowWidth": repr(round(scale * 1.1, 1)),
    }
    numbers = _instance_numbers(n_slices, "interleaved")
    sop_uids = [_uid(seed, "MR", index, "sop", 0, k) for k in range(n_slices)]
    datasets = _series_datasets(hdr, grid, numbers, sop_uids, vol, MRImageStorage)
    series_dir = folder / "SE000000"
    _write_series(series_dir, datasets, rng, ".dcm" if index % 4 == 1 else "")
    affine_ras = _LPS_TO_RAS @ grid.affine_lps()
    label_path = out / "labels" / f"{series_uid}.nii.gz" if labelled else None
    if label_path is not None:
        _write_label(label_path, labels, affine_ras)
    return [SynthSeries(
        modality="MR", patient=patient, study_uid=study_uid, series_uid=series_uid,
        frame_of_reference_uid=for_uid, dicom_dir=series_dir, label_path=label_path,
        shape=(matrix, matrix, n_slices), affine_ras=affine_ras, is_localizer=False,
        oblique=oblique, organ_centers_lps=_centers(anat),
    )]


# ----------------------------------------------------------------------------------------------
# Relatedness of the MR cohort to the CT cohort (the study's knob for positive and negative transfer)

# The conflicting anatomy of R = 0, per organ label: (relative size per semi-axis, shift in mm LPS,
# extra lumpiness of the surface). Liver and spleen trade places and sizes, the kidneys swap sides and
# move up, every surface gets lumpier: what a CT-trained feature says about where and how big an organ
# is becomes wrong for MR.
_CONFLICT = {
    1: (np.array([0.6, 0.65, 0.6]), np.array([0.0, 10.0, 30.0]), 2.5),   # liver: small, higher
    2: (np.array([1.8, 1.3, 1.3]), np.array([0.0, -15.0, -20.0]), 2.5),  # spleen: large, lower
    3: (np.array([1.3, 1.2, 0.8]), np.array([0.0, 0.0, 35.0]), 2.5),     # kidneys: rounder, higher
    4: (np.array([1.3, 1.2, 0.8]), np.array([0.0, 0.0, 50.0]), 2.5),
}


def _related_anatomy(anat: _Anatomy, relatedness: float, rng: np.random.Generator) -> _Anatomy:
    """Move a CT-distributed anatomy toward the conflicting one of ``relatedness = 0``.

    At ``relatedness = 1`` the anatomy is returned unchanged (the MR cohort is drawn from the CT
    cohort's distribution, byte-identical to a synth without the option). Below 1, with ``t = 1 - R``:
    the left/right layout is mirrored about the body axis with probability ``t`` per patient (liver on
    the patient's left, spleen on the right, the kidney labelled left on the right: a layout is either
    mirrored or not, never halfway), and every organ's size, cranio-caudal level and surface lumpiness
    move linearly by ``t`` toward :data:`_CONFLICT`.
    """
    if not 0.0 <= relatedness <= 1.0:
        raise ValueError(f"relatedness must be between 0 and 1, got {relatedness}")
    t = 1.0 - relatedness
    if t == 0.0:
        return anat
    mirrored = bool(rng.uniform() < t)
    organs = []
    for o in anat.organs:
        scale, shift, lumps = _CONFLICT[o.label]
        center = o.center.copy()
        if mirrored:
            center[0] = 2 * anat.center_xy[0] - center[0]
        organs.append(replace(
            o, center=center + t * shift,
            semi_axes=o.semi_axes * (1.0 + t * (scale - 1.0)),
            amps=o.amps * (1.0 + t * (lumps - 1.0)),
        ))
    return replace(anat, organs=tuple(organs))


def _centers(anat: _Anatomy) -> dict[int, tuple[float, float, float]]:
    return {o.label: tuple(float(v) for v in o.center) for o in anat.organs}


def _refuse_non_empty(path: Path) -> None:
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path}: exists and is not a folder; choose another OUT_DIR.")
        for _, _, files in os.walk(path):
            if files:
                raise FileExistsError(
                    f"{path}: already contains files; synthesize into an empty OUT_DIR "
                    "(or remove this folder) so old and new series are not mixed.")


def synthesize_exports(out_dir: Path | str, *, n_ct: int, n_mr: int, seed: int = 0,
                       ct_matrix: int = 96, mr_matrix: int = 80,
                       progress: bool = False, relatedness: float = 1.0, mr_labelled: int | None = None) -> SynthResult:
    """Write a synthetic PACS-like export of ``n_ct`` CT and ``n_mr`` MR patients, with label masks.

    CT and MR patients are disjoint. Each CT study holds a coronal localizer (no label) and an axial
    portal-venous series; each MR study holds one T2-weighted axial series, every third one oblique.
    File names, InstanceNumber and slice position disagree on purpose: readers must sort slices by
    ImagePositionPatient along the slice normal. The same arguments give byte-identical files.

    Args:
        out_dir: folder that receives ``export/`` and ``labels/``; both must be absent or empty.
        n_ct: number of CT patients (one study each).
        n_mr: number of MR patients (one study each).
        seed: seed of all anatomy, intensities, PHI, UIDs and dates.
        ct_matrix: rows and columns of the CT series.
        mr_matrix: rows and columns of the MR series.
        progress: print one line per study to stderr (no PHI).
        relatedness: 0..1, how the MR cohort's anatomy relates to the CT cohort's: drawn from the CT
            distribution at 1, from a conflicting one (mirrored layout, other sizes, positions and
            shapes) at 0; in between, mirrored layouts with probability 1 - R and sizes,
            positions and shapes linearly between the two (:func:`_related_anatomy`).
        mr_labelled: write label masks for only the first k MR patients (None = all); the other MR
            series are exported without a mask.

    Returns:
        A `SynthResult` describing every series written.

    Raises:
        FileExistsError: ``out_dir/export`` or ``out_dir/labels`` already holds files.
        ValueError: negative counts or a matrix too small to hold the anatomy sensibly.
    """
    if n_ct < 0 or n_mr < 0:
        raise InputError(f"n_ct and n_mr must be >= 0, got n_ct={n_ct}, n_mr={n_mr}.")
    if mr_labelled is not None and not 0 <= mr_labelled <= n_mr:
        raise InputError(f"mr_labelled must be between 0 and n_mr={n_mr}, got {mr_labelled}.")
    if not 0.0 <= relatedness <= 1.0:
        raise InputError(f"relatedness must be between 0 and 1, got {relatedness}.")
    if ct_matrix < 16 or mr_matrix < 16:
        raise InputError(f"ct_matrix and mr_matrix must be >= 16, got {ct_matrix} and {mr_matrix}.")
    root = Path(out_dir)
    export_dir, labels_dir = root / "export", root / "labels"
    _refuse_non_empty(export_dir)
    _refuse_non_empty(labels_dir)
    labels_dir.mkdir(parents=True, exist_ok=True)
    dicom_root = export_dir / "DICOM"

    phi_rng = _rng(seed, 0)
    patients = _make_patients(phi_rng, n_ct + n_mr)
    # One stream per patient so that a study's files do not depend on how many studies follow it.
    dates = [date(2023, 1, 2) + timedelta(days=int(_rng(seed, 3, p).integers(0, 700)))
             for p in range(n_ct + n_mr)]
    series: list[SynthSeries] = []
    for i in range(n_ct):
        folder = dicom_root / f"PA{i:06d}" / "ST000000"
        series += _ct_study(root, seed, i, patients[i], folder, ct_matrix, dates[i])
        if progress:
            print(f"synth: CT study {i + 1}/{n_ct} written", file=sys.stderr)
    for j in range(n_mr):
        p = n_ct + j
        folder = dicom_root / f"PA{p:06d}" / "ST000000"
        series += _mr_study(root, seed, j, patients[p], folder, mr_matrix, dates[p], relatedness=relatedness,
                            labelled=mr_labelled is None or j < mr_labelled)
        if progress:
            print(f"synth: MR study {j + 1}/{n_mr} written", file=sys.stderr)
    return SynthResult(root=root, export_dir=export_dir, labels_dir=labels_dir, series=series)
