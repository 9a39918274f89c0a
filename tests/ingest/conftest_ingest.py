"""Helpers for the ingest tests: write small DICOM series with planted traps, and check geometry in world
coordinates independently of medmtl (pydicom + nibabel + numpy only).

Import explicitly (``from conftest_ingest import ...`` with this folder on ``sys.path``); it is not a pytest
conftest so that it cannot clash with ``tests/data/conftest.py``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medmtl.procenv import interpreter_tool

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)

# Fake PHI planted in every header the helpers write; none of it may pass ingest.
PHI = {
    "PatientName": "QUIXOTE^ESMERALDA^ZENOBIA",
    "PatientID": "MRN-90817263",
    "PatientBirthDate": "19470314",
    "AccessionNumber": "ACC55512345",
    "InstitutionName": "SAINT HILDEGARD INFIRMARY",
    "ReferringPhysicianName": "BARTHOLOMEW^OCTAVIA",
    "OtherPatientIDs": "ALTID-4471829",
}


def phi_strings() -> list[str]:
    """Every planted PHI value and its name parts."""
    out = set()
    for v in PHI.values():
        out.add(v)
        out.update(p for p in v.split("^") if len(p) >= 5)
    return sorted(out)


def _ortho(iop):
    u, v = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    return u, v, np.cross(u, v)


def write_series(
    folder: Path,
    *,
    n: int = 6,
    rows: int = 8,
    cols: int = 10,
    pixel_spacing=(0.8, 0.7),
    step: float = 2.0,
    iop=AXIAL,
    origin=(-40.0, -30.0, 10.0),
    positions=None,
    modality: str = "CT",
    series_uid: str | None = None,
    patient_id: str | None = None,
    values="index",
    slope: float = 1.0,
    intercept: float = -1024.0,
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    names=None,
    shuffle_instances: bool = True,
    transfer_syntax=None,
    extra=None,
    seed: int = 0,
) -> list[Path]:
    """Write one single-frame CT/MR series and return the file paths in spatial (position) order.

    Positions default to ``origin + k * step * normal``; pass ``positions`` (n x 3, LPS mm) to plant gaps,
    tilt or duplicates. ``values="index"`` stores ``100 * k + r * cols + c`` (k = spatial index) so that each
    pixel is identifiable; a callable gets LPS points ``(rows, cols, 3)`` and returns stored values.
    Instance numbers and file names are shuffled against the spatial order on purpose.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    series_uid = series_uid or generate_uid()
    study_uid, for_uid = generate_uid(), generate_uid()
    u, v, nrm = _ortho(iop)
    if positions is None:
        positions = [np.asarray(origin, float) + k * step * nrm for k in range(n)]
    positions = np.asarray(positions, float)
    n = len(positions)
    inst = rng.permutation(n) + 1 if shuffle_instances else np.arange(n) + 1
    if names is None:
        names = [f"IM{int(x):06d}" for x in rng.permutation(n)]
    sop_class = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        for key, val in PHI.items():
            setattr(ds, key, val)
        if patient_id is not None:
            ds.PatientID = patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.Modality = modality
        ds.ImageType = list(image_type)
        ds.InstanceNumber = int(inst[k])
        ds.SeriesNumber = 3
        ds.ImagePositionPatient = [f"{x:.6f}" for x in positions[k]]
        ds.ImageOrientationPatient = [f"{x:.6f}" for x in iop]
        ds.PixelSpacing = [f"{x}" for x in pixel_spacing]
        ds.SliceThickness = "9.99"  # deliberately wrong: spacing must come from positions
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope}", f"{intercept}"
        if callable(values):
            r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
            pts = positions[k] + c[..., None] * pixel_spacing[1] * u + r[..., None] * pixel_spacing[0] * v
            arr = np.asarray(np.rint(values(pts)), dtype=np.int16)
        else:
            arr = (100 * k + np.arange(rows * cols).reshape(rows, cols)).astype(np.int16)
        ds.PixelData = arr.tobytes()
        for key, val in (extra or {}).items():
            setattr(ds, key, val(k) if callable(val) else val)
        if transfer_syntax is not None:
            ds.compress(transfer_syntax, arr)
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_non_image(path: Path, kind: str) -> Path:
    """Write a non-image object carrying PHI: ``SR``, ``RTSTRUCT`` or ``PR``."""
    sop = {
        "SR": "1.2.840.10008.5.1.4.1.1.88.11",
        "RTSTRUCT": "1.2.840.10008.5.1.4.1.1.481.3",
        "PR": "1.2.840.10008.5.1.4.1.1.11.1",
    }[kind]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop, ds.file_meta.MediaStorageSOPInstanceUID
    for key, val in PHI.items():
        setattr(ds, key, val)
    ds.Modality = kind
    ds.SeriesInstanceUID = generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_world_values(path: Path):
    """(RAS points (P, 3), rescaled values (P,)) of every pixel of a single-frame DICOM file, computed
    straight from its header by the DICOM definition (independent of medmtl)."""
    ds = pydicom.dcmread(path)
    iop = np.array([float(x) for x in ds.ImageOrientationPatient])
    ipp = np.array([float(x) for x in ds.ImagePositionPatient])
    dr, dc = (float(x) for x in ds.PixelSpacing)
    r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
    lps = ipp + c[..., None] * dc * iop[:3] + r[..., None] * dr * iop[3:]
    ras = lps.reshape(-1, 3) * np.array([-1.0, -1.0, 1.0])
    vals = ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    return ras, vals.reshape(-1)


def assert_world_match(nifti_path: Path, dicom_paths, *, tol_vox: float = 1e-3) -> None:
    """Every pixel of every DICOM file lands on a voxel centre of the NIfTI that holds its value."""
    img = nib.load(str(nifti_path))
    data = np.asanyarray(img.dataobj)
    inv = np.linalg.inv(img.affine)
    for p in dicom_paths:
        ras, vals = dicom_world_values(p)
        ijk = ras @ inv[:3, :3].T + inv[:3, 3]
        idx = np.rint(ijk).astype(int)
        assert np.max(np.abs(ijk - idx)) < tol_vox, f"{p.name}: pixels fall between voxel centres"
        assert np.all(idx >= 0) and np.all(idx < np.array(data.shape)), f"{p.name}: pixels outside the volume"
        np.testing.assert_allclose(data[idx[:, 0], idx[:, 1], idx[:, 2]], vals, atol=1e-3, err_msg=p.name)


def assert_same_world(ours: Path, theirs: Path, *, tol_vox: float = 1e-3) -> None:
    """Two NIfTI files of one series hold the same values at the same RAS positions, whatever their
    voxel order (e.g. medmtl vs dcm2niix, which flips rows)."""
    a, b = nib.load(str(ours)), nib.load(str(theirs))
    da, db = a.get_fdata(), b.get_fdata()
    if db.ndim == 4:
        db = db[..., 0]
    assert sorted(da.shape) == sorted(db.shape), (da.shape, db.shape)
    i, j, k = np.meshgrid(*(np.arange(s) for s in da.shape), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)
    world = ijk @ a.affine[:3, :3].T + a.affine[:3, 3]
    inv = np.linalg.inv(b.affine)
    ijk_b = world @ inv[:3, :3].T + inv[:3, 3]
    idx = np.rint(ijk_b).astype(int)
    assert np.max(np.abs(ijk_b - idx)) < tol_vox, np.max(np.abs(ijk_b - idx))
    np.testing.assert_allclose(da.ravel(), db[idx[:, 0], idx[:, 1], idx[:, 2]], atol=1e-3)


def dcm2niix_convert(dicom_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Run the dcm2niix wheel beside this interpreter on ``dicom_dir``; return {SeriesInstanceUID: nifti path}.

    dcm2niix is a dev dependency: missing, it fails the test (a broken install must not turn green).
    """
    exe = interpreter_tool("dcm2niix")
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-z", "n", "-b", "n", "-f", "%j", "-o", str(out_dir), str(dicom_dir)],
                   check=True, capture_output=True)
    return {p.name[: -len(".nii")]: p for p in out_dir.glob("*.nii")}
