"""Synthetic exports: geometry in world coordinates, encodings, PHI and determinism.

Every check reads the written files back independently with pydicom and nibabel, sorting slices by
ImagePositionPatient along the normal as a correct reader must, instead of trusting the generator.
"""

from __future__ import annotations

import filecmp
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medmtl.synth import LABELS, SynthResult, SynthSeries, synthesize_exports

LIVER, SPLEEN, KIDNEY_L, KIDNEY_R = 1, 2, 3, 4
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> SynthResult:
    # Three MR studies so that the every-third-one oblique series is present.
    return synthesize_exports(tmp_path_factory.mktemp("synth") / "out", n_ct=2, n_mr=3, seed=0)


class ReadSeries:
    """A series read back from disk: slices sorted by position along cross(row_dir, col_dir)."""

    def __init__(self, folder: Path):
        datasets = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
        iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
        self.row_dir, self.col_dir = iop[:3], iop[3:]
        self.normal = np.cross(self.row_dir, self.col_dir)
        self.file_order_positions = [
            float(np.dot(np.array(d.ImagePositionPatient, dtype=float), self.normal)) for d in datasets
        ]
        self.datasets = sorted(
            datasets, key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), self.normal))
        )
        self.positions = np.array([d.ImagePositionPatient for d in self.datasets], dtype=float)
        first = self.datasets[0]
        self.stored = np.stack([d.pixel_array.T for d in self.datasets], axis=-1)  # (cols, rows, k)
        slope = float(getattr(first, "RescaleSlope", 1.0))
        intercept = float(getattr(first, "RescaleIntercept", 0.0))
        self.values = self.stored.astype(float) * slope + intercept
        spacing_rows, spacing_cols = (float(v) for v in first.PixelSpacing)
        if len(self.positions) > 1:
            self.slice_spacing = float(np.dot(self.positions[1] - self.positions[0], self.normal))
        else:
            self.slice_spacing = float(first.SliceThickness)
        self.affine_lps = np.eye(4)
        self.affine_lps[:3, 0] = self.row_dir * spacing_cols
        self.affine_lps[:3, 1] = self.col_dir * spacing_rows
        self.affine_lps[:3, 2] = self.normal * self.slice_spacing
        self.affine_lps[:3, 3] = self.positions[0]
        self.pixel_spacing = (spacing_rows, spacing_cols)

    def sample_lps(self, points_lps: np.ndarray) -> np.ndarray:
        """Values at world LPS points ``(N, 3)``, nearest voxel; points must lie inside the grid."""
        ijk = np.c_[points_lps, np.ones(len(points_lps))] @ np.linalg.inv(self.affine_lps).T
        idx = np.round(ijk[:, :3]).astype(int)
        assert (idx >= 0).all() and (idx < np.array(self.values.shape)).all()
        return self.values[idx[:, 0], idx[:, 1], idx[:, 2]]


def _label_world_points(series: SynthSeries, label: int) -> np.ndarray:
    """LPS world coordinates of the mask voxels of ``label``, through the NIfTI's own affine."""
    img = nib.load(series.label_path)
    ijk = np.argwhere(np.asarray(img.dataobj) == label).astype(float)
    ras = np.c_[ijk, np.ones(len(ijk))] @ img.affine.T
    return (ras @ LPS_TO_RAS.T)[:, :3]


def _image_series(result: SynthResult, modality: str) -> list[SynthSeries]:
    return [s for s in result.series if s.modality == modality and not s.is_localizer]


def test_layout_has_no_phi_in_paths_and_one_label_per_image_series(export):
    files = [p for p in export.export_dir.rglob("*") if p.is_file()]
    assert files
    forbidden = export.phi_strings() + export.uid_strings()
    for path in files:
        rel = str(path.relative_to(export.root))
        assert not any(s in rel for s in forbidden), rel
        assert not path.name.startswith("."), f"temporary file left behind: {rel}"
    labels = sorted(p.name for p in export.labels_dir.iterdir())
    image_series = [s for s in export.series if not s.is_localizer]
    assert labels == sorted(f"{s.series_uid}.nii.gz" for s in image_series)
    for s in image_series:
        assert s.label_path == export.labels_dir / f"{s.series_uid}.nii.gz"


def test_each_ct_study_has_a_coronal_localizer_without_label(export):
    ct_studies = {s.study_uid for s in export.series if s.modality == "CT"}
    localizers = [s for s in export.series if s.is_localizer]
    assert {s.study_uid for s in localizers} == ct_studies and len(localizers) == len(ct_studies)
    for s in localizers:
        assert s.label_path is None and s.modality == "CT"
        read = ReadSeries(s.dicom_dir)
        assert len(read.datasets) == 1
        assert list(read.datasets[0].ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        assert abs(read.normal[1]) == pytest.approx(1.0)  # coronal: normal along anterior-posterior


def test_file_names_and_instance_numbers_disagree_with_position(export):
    non_monotonic_instances = 0
    for s in export.series:
        if s.is_localizer:
            continue
        read = ReadSeries(s.dicom_dir)
        assert read.file_order_positions != sorted(read.file_order_positions), s.dicom_dir
        numbers = [int(d.InstanceNumber) for d in read.datasets]
        diffs = np.diff(numbers)
        non_monotonic_instances += not ((diffs > 0).all() or (diffs < 0).all())
    assert non_monotonic_instances > 0


def test_label_affine_and_shape_match_dicom_headers(export):
    for s in export.series:
        if s.is_localizer:
            continue
        read = ReadSeries(s.dicom_dir)
        img = nib.load(s.label_path)
        assert img.shape == read.values.shape == s.shape
        assert np.asarray(img.dataobj).dtype == np.uint8
        np.testing.assert_allclose(img.affine, LPS_TO_RAS @ read.affine_lps, atol=1e-3)
        np.testing.assert_allclose(s.affine_ras, img.affine, atol=1e-6)
        assert set(np.unique(np.asarray(img.dataobj))) <= {0, *LABELS}
        # Slices are evenly spaced along the normal: readers may derive the spacing from any pair.
        steps = np.diff(read.positions @ read.normal)
        np.testing.assert_allclose(steps, read.slice_spacing, atol=1e-3)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_organs_sit_where_placed_and_on_the_anatomical_side(export, modality):
    for s in _image_series(export, modality):
        centroids = {lab: _label_world_points(s, lab).mean(axis=0) for lab in LABELS}
        for lab, centroid in centroids.items():
            assert np.linalg.norm(centroid - np.array(s.organ_centers_lps[lab])) < 15.0, (s, lab)
        # LPS: +x is patient left, +y posterior, +z superior.
        assert centroids[LIVER][0] < 0 < centroids[SPLEEN][0]
        assert centroids[KIDNEY_R][0] < 0 < centroids[KIDNEY_L][0]
        assert centroids[KIDNEY_L][1] > centroids[LIVER][1]
        assert centroids[KIDNEY_R][2] < centroids[KIDNEY_L][2]


def test_ct_intensities_at_label_world_points_are_organ_like(export):
    expected_hu = {LIVER: (85, 115), SPLEEN: (95, 125), KIDNEY_L: (145, 195), KIDNEY_R: (145, 195)}
    for s in _image_series(export, "CT"):
        read = ReadSeries(s.dicom_dir)
        for lab, (lo, hi) in expected_hu.items():
            hu = read.sample_lps(_label_world_points(s, lab))
            assert lo <= np.median(hu) <= hi, (s.series_uid, LABELS[lab], np.median(hu))
        liver = _label_world_points(s, LIVER)
        # The voxels around the liver's centroid are liver tissue, read through the DICOM geometry.
        centroid = liver.mean(axis=0)
        near = liver[np.linalg.norm(liver - centroid, axis=1) < 20.0]
        assert len(near) > 10
        assert 80 <= np.median(read.sample_lps(near)) <= 120
        assert np.median(read.values[read.values.shape[0] // 2, 0, :]) < -900  # air above the belly
        assert read.values.max() > 400  # bone


def test_ct_encoding_and_spacing(export):
    for s in _image_series(export, "CT"):
        read = ReadSeries(s.dicom_dir)
        first = read.datasets[0]
        assert read.stored.dtype == np.int16
        assert (first.BitsAllocated, first.PixelRepresentation) == (16, 1)
        assert float(first.RescaleIntercept) == -1024 and float(first.RescaleSlope) == 1
        assert str(first.SOPClassUID) == pydicom.uid.CTImageStorage
        assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert all(3.6 <= v <= 4.2 for v in read.pixel_spacing)
        assert read.slice_spacing in (4.0, 5.0) and read.slice_spacing > max(read.pixel_spacing)
        assert 40 <= len(read.datasets) <= 55
        assert s.shape == (96, 96, len(read.datasets))
        np.testing.assert_allclose(read.normal, [0, 0, 1], atol=1e-6)


def test_mr_patients_encoding_scale_and_contrast(export):
    mr, ct = _image_series(export, "MR"), _image_series(export, "CT")
    mr_ids = {s.patient.patient_id for s in mr}
    assert len(mr_ids) == len(mr)
    assert mr_ids.isdisjoint({s.patient.patient_id for s in ct})
    assert {s.patient.name for s in mr}.isdisjoint({s.patient.name for s in ct})
    kidney_levels = []
    for s in mr:
        read = ReadSeries(s.dicom_dir)
        first = read.datasets[0]
        assert read.stored.dtype == np.uint16 and first.PixelRepresentation == 0
        assert str(first.SOPClassUID) == pydicom.uid.MRImageStorage
        assert read.slice_spacing == pytest.approx(6.0, abs=1e-3)
        assert all(4.2 <= v <= 5.0 for v in read.pixel_spacing)
        assert float(first.MagneticFieldStrength) > 0 and float(first.EchoTime) > 0
        liver = np.median(read.sample_lps(_label_world_points(s, LIVER)))
        spleen = np.median(read.sample_lps(_label_world_points(s, SPLEEN)))
        kidney = np.median(read.sample_lps(_label_world_points(s, KIDNEY_L)))
        assert spleen > 1.5 * liver and kidney > 1.5 * liver  # T2-like, unlike CT
        kidney_levels.append(kidney)
    assert max(kidney_levels) > 1.3 * min(kidney_levels)  # arbitrary scale per series


def test_oblique_mr_geometry_is_consistent(export):
    oblique = [s for s in _image_series(export, "MR") if s.oblique]
    assert oblique and len(oblique) < len(_image_series(export, "MR"))
    for s in oblique:
        read = ReadSeries(s.dicom_dir)
        assert abs(np.dot(read.row_dir, read.col_dir)) < 1e-5
        tilt = np.degrees(np.arccos(abs(read.normal[2])))
        assert 10 - 0.1 <= tilt <= 20 + 0.1
        # Every slice's position lies on the line through the first one along the normal.
        offsets = read.positions - read.positions[0]
        in_plane = offsets - np.outer(offsets @ read.normal, read.normal)
        assert np.abs(in_plane).max() < 1e-3
        spleen = read.sample_lps(_label_world_points(s, SPLEEN))
        liver = read.sample_lps(_label_world_points(s, LIVER))
        assert np.median(spleen) > 1.5 * np.median(liver)


def test_phi_strings_are_in_headers(export):
    for s in export.series:
        p = s.patient
        strings = p.phi_strings()
        assert all(len(x) >= 6 for x in strings)
        assert p.name in strings and p.name.split("^")[0] in strings
        assert p.patient_id in strings and p.birth_date in strings and p.accession_number in strings
        raw = next(s.dicom_dir.iterdir()).read_bytes()
        for x in strings:
            assert x.encode("latin-1") in raw, (x, s.dicom_dir)
        ds = pydicom.dcmread(next(s.dicom_dir.iterdir()))
        assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate) == (
            p.name, p.patient_id, p.birth_date)
        assert ds.AccessionNumber == p.accession_number


def test_same_seed_gives_identical_files_and_other_seed_differs(export, tmp_path):
    again = synthesize_exports(tmp_path / "again", n_ct=2, n_mr=3, seed=0)
    ours = sorted(p.relative_to(export.root) for p in export.root.rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file())
    assert ours == theirs
    _, mismatch, errors = filecmp.cmpfiles(export.root, again.root, ours, shallow=False)
    assert not mismatch and not errors

    other = synthesize_exports(tmp_path / "other", n_ct=1, n_mr=0, seed=1)
    other_files = sorted(p for p in (other.export_dir / "DICOM" / "PA000000").rglob("*") if p.is_file())
    ours_ct0 = sorted(p for p in (export.export_dir / "DICOM" / "PA000000").rglob("*") if p.is_file())
    assert other_files[0].read_bytes() != ours_ct0[0].read_bytes()
    assert set(other.phi_strings()) != set(p for s in export.series[:2] for p in s.patient.phi_strings())


def test_refuses_an_export_that_already_holds_files(tmp_path):
    (tmp_path / "export" / "DICOM").mkdir(parents=True)
    synthesize_exports(tmp_path, n_ct=0, n_mr=0)  # empty folders are fine
    (tmp_path / "export" / "DICOM" / "IM000001").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path / "export"))):
        synthesize_exports(tmp_path, n_ct=1, n_mr=0)
