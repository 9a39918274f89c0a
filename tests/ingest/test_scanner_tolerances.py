"""Real-scanner tolerances: rounded or jittered ImagePositionPatient and a 0.02-degree apparent shear are
written as they are, on the grid dcm2niix writes (same shape, identical values); real tilts still corrected.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_ingest import assert_world_match, dcm2niix_convert, write_series  # noqa: E402

from medmtl.ingest.dicom_series import TILT_TOL_VOXELS  # noqa: E402
from medmtl.ingest.run import ingest  # noqa: E402

ROWS, COLS, N, STEP = 24, 20, 40, 5.0
SPACING = (0.8, 0.7)
ORIGIN = np.array([-40.0, -30.0, 10.0])


def _positions(kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = np.arange(N)[:, None]
    z = np.array([0.0, 0.0, 1.0])
    if kind == "shear_0.02deg":
        # an apparent shear of 0.02 degrees along y, with positions written to 2 decimals
        pos = ORIGIN + k * STEP * (z + np.tan(np.radians(0.02)) * np.array([0.0, 1.0, 0.0]))
        return np.round(pos, 2)
    pos = ORIGIN + k * STEP * z + np.array([0.013, -0.027, 0.0461])
    if kind == "round_0.1mm":
        return np.round(pos + rng.uniform(-0.049, 0.049, pos.shape), 1)
    if kind == "round_2dp":
        return np.round(pos + rng.uniform(-0.07, 0.07, pos.shape), 2)
    if kind == "jitter_0.07mm":
        return pos + rng.uniform(-0.07, 0.07, pos.shape)  # random sub-voxel jitter on every axis
    raise ValueError(kind)


def _ramp(pts):
    return 40.0 * pts[..., 0] - 25.0 * pts[..., 1] + 30.0 * pts[..., 2] + 2000.0


def _in_our_axes(theirs: nib.Nifti1Image, ours: nib.Nifti1Image) -> np.ndarray:
    data = theirs.get_fdata()
    if data.ndim == 4:
        data = data[..., 0]
    return apply_orientation(data, ornt_transform(io_orientation(theirs.affine), io_orientation(ours.affine)))


@pytest.mark.parametrize("kind", ["round_0.1mm", "round_2dp", "jitter_0.07mm", "shear_0.02deg"])
def test_scanner_jitter_and_apparent_shear_give_the_dcm2niix_grid(tmp_path, kind):
    files = write_series(tmp_path / "export" / "S", positions=_positions(kind), rows=ROWS, cols=COLS,
                         pixel_spacing=SPACING, values=_ramp)
    report = ingest(tmp_path / "export", tmp_path / "data", progress=False, workers=1)
    (rec,) = report.series
    assert rec.status == "accepted", rec.reasons
    # written as is: no correction, at most an informational detail
    assert not {"gantry_tilt", "non_uniform_spacing"} & set(rec.warnings), rec.details
    assert rec.shape == [COLS, ROWS, N]
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    niix = dcm2niix_convert(tmp_path / "export", tmp_path / "niix")
    assert uid in niix, f"dcm2niix wheel missing or wrote {sorted(niix)}; install the dev extra"
    ours = nib.load(str(tmp_path / "data" / rec.output))
    theirs = _in_our_axes(nib.load(str(niix[uid])), ours)
    assert theirs.shape == ours.shape
    np.testing.assert_array_equal(ours.get_fdata(), theirs)
    # every DICOM pixel lies within the tolerance of the voxel that holds its value. (dcm2niix takes the
    # slice spacing from the first two positions, so its world positions drift along a jittered stack;
    # medmtl's (last - first) / (n - 1) keeps every slice within the tolerance.)
    assert_world_match(tmp_path / "data" / rec.output, files, tol_vox=TILT_TOL_VOXELS)


def test_a_one_degree_tilt_with_rounded_positions_is_still_corrected(tmp_path):
    k = np.arange(N)[:, None]
    pos = np.round(ORIGIN + k * STEP * (np.array([0, 0, 1.0]) + np.tan(np.radians(1.0)) * np.array([0, 1.0, 0])), 1)
    write_series(tmp_path / "export" / "S", positions=pos, rows=ROWS, cols=COLS, pixel_spacing=SPACING, values=_ramp)
    (rec,) = ingest(tmp_path / "export", tmp_path / "data", progress=False, workers=1).series
    assert "gantry_tilt" in rec.warnings and "1.00 degrees" in rec.details["gantry_tilt"]
    assert rec.shape[1] > ROWS  # enlarged along the shift, nothing cropped


def test_genuinely_uneven_spacing_is_still_resampled(tmp_path):
    z = np.arange(N) * STEP
    z[N // 2:] += 1.5  # one step of 6.5 mm among 5 mm steps: 0.3 slice off the grid, no gap
    pos = ORIGIN + z[:, None] * np.array([0, 0, 1.0])
    write_series(tmp_path / "export" / "S", positions=pos, rows=ROWS, cols=COLS, pixel_spacing=SPACING, values=_ramp)
    (rec,) = ingest(tmp_path / "export", tmp_path / "data", progress=False, workers=1).series
    assert "non_uniform_spacing" in rec.warnings and rec.spacing[2] == pytest.approx(STEP)
