"""Gantry-tilted CT: the corrected volume keeps every pixel, holds air where no slice reaches, and labels on
either accepted grid follow the image. Geometry is checked in world coordinates computed from the DICOM
headers by the test itself, never by array indices of medmtl's output."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.ndimage import map_coordinates

sys.path.insert(0, os.path.dirname(__file__))
from conftest_ingest import assert_world_match, dcm2niix_convert, dicom_world_values, write_series  # noqa: E402

from medmtl.ingest.run import ingest  # noqa: E402

ROWS, COLS, N, STEP = 12, 10, 8, 2.0
SPACING = (0.8, 0.7)  # PixelSpacing: between rows (along v = y), between columns (along u = x)
ORIGIN = np.array([-40.0, -30.0, 10.0])
AIR = -1024.0
INTERCEPT = -1024.0


def _ramp(pts):
    """Stored value: linear in LPS mm, steep enough that a tenth of a voxel misplaced shows (>= 2 units)."""
    return 40.0 * pts[..., 0] - 25.0 * pts[..., 1] + 30.0 * pts[..., 2] + 2000.0


# Largest change of the (rescaled) ramp between neighbouring voxels in-plane.
RAMP_STEP = max(40.0 * SPACING[1], 25.0 * SPACING[0])


def _positions(axis: str, deg: float) -> np.ndarray:
    """Slice positions sheared by ``deg`` degrees along LPS ``axis`` (x or y) against the z normal."""
    d = {"x": np.array([1.0, 0, 0]), "y": np.array([0, 1.0, 0])}[axis]
    return np.array([ORIGIN + k * STEP * (np.array([0, 0, 1.0]) + np.tan(np.radians(deg)) * d) for k in range(N)])


def _ingest_tilted(tmp_path: Path, axis="y", deg=15.0, labels_dir=None, extra=None):
    files = write_series(tmp_path / "export" / "S", positions=_positions(axis, deg), rows=ROWS, cols=COLS,
                         pixel_spacing=SPACING, values=_ramp, intercept=INTERCEPT, extra=extra)
    report = ingest(tmp_path / "export", tmp_path / "data", labels_dir=labels_dir, progress=False, workers=2)
    (rec,) = report.series
    return files, rec


def _to_voxels(img, ras: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(img.affine)
    return ras @ inv[:3, :3].T + inv[:3, 3]


def _voxel_world(img) -> tuple[np.ndarray, np.ndarray]:
    """(voxel indices (V, 3), their LPS positions (V, 3)) of every voxel of ``img``."""
    ijk = np.stack(np.meshgrid(*(np.arange(s) for s in img.shape[:3]), indexing="ij"), -1).reshape(-1, 3)
    ras = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    return ijk, ras * np.array([-1.0, -1.0, 1.0])


def _inside_source_footprint(files, lps: np.ndarray) -> np.ndarray:
    """Whether each LPS point lies on a source slice's plane within its pixels' footprint (half a pixel
    beyond the outer pixel centres), from the DICOM headers alone."""
    inside = np.zeros(len(lps), bool)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.array([float(x) for x in ds.ImageOrientationPatient])
        ipp = np.array([float(x) for x in ds.ImagePositionPatient])
        dr, dc = (float(x) for x in ds.PixelSpacing)
        u, v = iop[:3], iop[3:]
        rel = lps - ipp
        on_plane = np.abs(rel @ np.cross(u, v)) < 1e-3
        c, r = rel @ u / dc, rel @ v / dr
        inside |= on_plane & (c >= -0.5) & (c < ds.Columns - 0.5) & (r >= -0.5) & (r < ds.Rows - 0.5)
    return inside


@pytest.mark.parametrize("axis, deg", [("y", 15.0), ("y", -15.0), ("x", 12.0)])
def test_tilt_correction_keeps_every_pixel_and_fills_air(tmp_path, axis, deg):
    files, rec = _ingest_tilted(tmp_path, axis, deg)
    assert rec.status == "accepted" and "gantry_tilt" in rec.warnings
    # Grid growth, from the headers: the last slice's in-plane offset in voxels, rounded up.
    spacing = SPACING[1] if axis == "x" else SPACING[0]
    growth = math.ceil((N - 1) * STEP * math.tan(math.radians(abs(deg))) / spacing)
    detail = rec.details["gantry_tilt"]
    assert f"{abs(deg):.2f} degrees" in detail and f"enlarged by {growth} voxel(s)" in detail and "-1024 HU" in detail
    assert rec.shape == ([COLS + growth, ROWS, N] if axis == "x" else [COLS, ROWS + growth, N])  # shift axis only

    img = nib.load(str(tmp_path / "data" / rec.output))
    data = np.asanyarray(img.dataobj).astype(np.float64)
    axes = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-6)  # no shear left
    for f in files:
        ras, vals = dicom_world_values(f)
        ijk = _to_voxels(img, ras)
        # None cropped: every pixel centre lies within the volume.
        assert np.all(ijk > -1e-3) and np.all(ijk < np.array(data.shape) - 1 + 1e-3), f.name
        # The voxel nearest to each pixel holds its value, up to half a voxel of ramp (never the air fill).
        near = np.rint(ijk).astype(int)
        np.testing.assert_allclose(data[tuple(near.T)], vals, atol=0.5 * RAMP_STEP + 1.5, err_msg=f.name)
        # Away from the slice border, linear interpolation at the pixel's position gives its value back
        # (exact on a ramp up to the int16 rounding of source and output).
        r, c = np.meshgrid(np.arange(ROWS), np.arange(COLS), indexing="ij")
        interior = ((r > 0) & (r < ROWS - 1) & (c > 0) & (c < COLS - 1)).ravel()
        got = map_coordinates(data, ijk[interior].T, order=1)
        np.testing.assert_allclose(got, vals[interior], atol=1.5, err_msg=f.name)

    # The enlarged margin holds air and only there: a voxel has data exactly when it lies in a slice's footprint.
    ijk, lps = _voxel_world(img)
    covered = _inside_source_footprint(files, lps)
    values = data[tuple(ijk.T)]
    assert np.all(values[~covered] == AIR) and (~covered).any()
    assert np.all(values[covered] > AIR + 500)  # the ramp's lowest HU is above 100
    assert covered.sum() == N * ROWS * COLS  # as many data voxels as source pixels


def test_zero_tilt_changes_nothing(tmp_path):
    files, rec = _ingest_tilted(tmp_path, "y", 0.0)
    assert rec.status == "accepted" and "gantry_tilt" not in rec.warnings
    assert rec.shape == [COLS, ROWS, N]
    img = nib.load(str(tmp_path / "data" / rec.output))
    np.testing.assert_allclose(img.affine[:3, 3], ORIGIN * np.array([-1.0, -1.0, 1.0]))
    assert_world_match(tmp_path / "data" / rec.output, files)  # every pixel on a voxel centre, value exact


def _source_grid_affine(files) -> np.ndarray:
    """RAS affine of the uncorrected (sheared) DICOM grid, from the headers of the first and last slice."""
    first, last = (pydicom.dcmread(f, stop_before_pixels=True) for f in (files[0], files[-1]))
    iop = np.array([float(x) for x in first.ImageOrientationPatient])
    ipp0, ipp1 = (np.array([float(x) for x in d.ImagePositionPatient]) for d in (first, last))
    dr, dc = (float(x) for x in first.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = iop[:3] * dc, iop[3:] * dr, (ipp1 - ipp0) / (len(files) - 1), ipp0
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _write_label(tmp_path: Path, files, mask, affine) -> Path:
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    labels = tmp_path / "labels"
    labels.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(mask, affine), labels / f"{uid}.nii.gz")
    return labels


@pytest.mark.parametrize("deg", [15.0, -15.0])
def test_label_on_the_dicom_grid_follows_the_image(tmp_path, deg):
    files = write_series(tmp_path / "export" / "S", positions=_positions("y", deg), rows=ROWS, cols=COLS,
                         pixel_spacing=SPACING, values=_ramp)
    # Values 1..3 everywhere, varying with column and row, so that misplacement and loss both show.
    c, r = np.meshgrid(np.arange(COLS), np.arange(ROWS), indexing="ij")
    mask = np.repeat((1 + (c + 2 * r) % 3)[:, :, None], N, axis=2).astype(np.uint8)
    labels = _write_label(tmp_path, files, mask, _source_grid_affine(files))
    report = ingest(tmp_path / "export", tmp_path / "data", labels_dir=labels, progress=False, workers=2)
    (rec,) = report.series
    assert rec.status == "accepted" and rec.label_source == "label_dir" and "gantry_tilt" in rec.warnings
    img, lab = (nib.load(str(tmp_path / "data" / p)) for p in (rec.output, rec.label))
    np.testing.assert_allclose(lab.affine, img.affine)
    ldata, idata = np.asanyarray(lab.dataobj), np.asanyarray(img.dataobj)
    assert lab.shape == img.shape and lab.get_data_dtype() == np.uint8
    for k, f in enumerate(files):  # files are in spatial order: slice k of the mask
        ras, _ = dicom_world_values(f)
        near = np.rint(_to_voxels(lab, ras)).astype(int)
        np.testing.assert_array_equal(ldata[tuple(near.T)], mask[:, :, k].T.ravel(), err_msg=f.name)
    # Nearest neighbour: no label voxel lost or invented, and labelled exactly where the image has data.
    assert np.array_equal(np.bincount(ldata.ravel(), minlength=4)[1:], np.bincount(mask.ravel(), minlength=4)[1:])
    np.testing.assert_array_equal(ldata > 0, idata != AIR)


def test_label_on_the_enlarged_grid_is_taken_as_is_and_on_the_cropped_grid_rejected(tmp_path):
    files = write_series(tmp_path / "export" / "S", positions=_positions("y", 15.0), rows=ROWS, cols=COLS,
                         pixel_spacing=SPACING, values=_ramp)
    ref = ingest(tmp_path / "export", tmp_path / "ref", progress=False).series[0]
    img = nib.load(str(tmp_path / "ref" / ref.output))
    mask = (np.arange(np.prod(img.shape)).reshape(img.shape) % 4).astype(np.uint8)
    labels = _write_label(tmp_path, files, mask, img.affine)
    (rec,) = ingest(tmp_path / "export", tmp_path / "data", labels_dir=labels, progress=False).series
    assert rec.status == "accepted" and rec.label_source == "label_dir"
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "data" / rec.label)).dataobj), mask)

    # The corrected grid without the enlargement (ingests before it): the mask cannot cover the anatomy
    # the margin brought back, so it is a mismatch that names both accepted grids.
    cropped = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.array(
        [[SPACING[1], 0, 0, ORIGIN[0]], [0, SPACING[0], 0, ORIGIN[1]], [0, 0, STEP, ORIGIN[2]], [0, 0, 0, 1]])
    labels = _write_label(tmp_path, files, np.ones((COLS, ROWS, N), np.uint8), cropped)
    (rec,) = ingest(tmp_path / "export", tmp_path / "data2", labels_dir=labels, progress=False).series
    assert rec.status == "rejected" and rec.reasons == ["label_mismatch"]
    why = rec.details["label_mismatch"]
    assert "tilt-corrected grid (10, 17, 8)" in why and "original DICOM grid (10, 12, 8)" in why


def _corners_world(img) -> np.ndarray:
    shape = img.shape[:3]
    ijk = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)
    return ijk @ img.affine[:3, :3].T + img.affine[:3, 3]


def test_covers_at_least_the_extent_of_dcm2niix_tilt_output(tmp_path):
    # GantryDetectorTilt agrees in sign with the positions: dcm2niix reads the tag to correct.
    files, rec = _ingest_tilted(tmp_path, "y", 15.0, extra={"GantryDetectorTilt": "-15"})
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    niix = dcm2niix_convert(tmp_path / "export", tmp_path / "niix")
    assert niix, "dcm2niix wrote no NIfTI"
    theirs = nib.load(str(niix[f"{uid}_Tilt_1"]))
    ours = nib.load(str(tmp_path / "data" / rec.output))
    a, b = _corners_world(ours), _corners_world(theirs)
    assert np.all(a.min(0) <= b.min(0) + 1e-3) and np.all(a.max(0) >= b.max(0) - 1e-3), (a.min(0), a.max(0), b.min(0), b.max(0))
