"""Series assembly traps: each test plants one trap in a small export and checks what a user relies on,
with geometry checked in world coordinates computed from the DICOM headers by the test itself."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

sys.path.insert(0, os.path.dirname(__file__))
from conftest_ingest import (  # noqa: E402
    CORONAL,
    assert_same_world,
    assert_world_match,
    dcm2niix_convert,
    write_non_image,
    write_series,
)

from medmtl.ingest.dicom_series import check_series, read_volume, scan_file, SeriesCandidate  # noqa: E402
from medmtl.ingest.run import ingest  # noqa: E402


def run(export: Path, out: Path, **kw):
    report = ingest(export, out, progress=False, workers=2, **kw)
    return report, {r.series_key: r for r in report.series}


def accepted(report):
    return [r for r in report.series if r.status == "accepted"]


def rejected(report):
    return [r for r in report.series if r.status == "rejected"]


def oblique_iop(deg_a=20.0, deg_b=10.0):
    a, b = np.radians(deg_a), np.radians(deg_b)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = rz @ rx
    return tuple(np.round(np.concatenate([r[:, 0], r[:, 1]]), 6))


def test_slices_sorted_by_position_not_instance_number_or_name(tmp_path):
    # Positions run downwards along the normal while instance numbers and names are shuffled.
    pos = [(-40.0, -30.0, 50.0 - 2.5 * k) for k in range(7)]
    files = write_series(tmp_path / "export" / "S1", positions=pos)
    report, _ = run(tmp_path / "export", tmp_path / "data")
    (rec,) = accepted(report)
    assert rec.spacing[2] == pytest.approx(2.5)  # from positions; SliceThickness says 9.99
    assert_world_match(tmp_path / "data" / rec.output, files)


def test_oblique_series_matches_dicom_and_dcm2niix_in_world_space(tmp_path):
    iop = oblique_iop()
    files = write_series(tmp_path / "export" / "S1", iop=iop, n=8, rows=12, cols=9, modality="MR", intercept=0)
    report, _ = run(tmp_path / "export", tmp_path / "data")
    (rec,) = accepted(report)
    ours = tmp_path / "data" / rec.output
    assert_world_match(ours, files)
    theirs = dcm2niix_convert(tmp_path / "export", tmp_path / "dcm2niix")
    assert theirs, "dcm2niix wrote no NIfTI"
    (niix,) = theirs.values()
    assert_same_world(ours, niix)


def test_two_series_in_one_folder_are_not_interleaved(tmp_path):
    folder = tmp_path / "export" / "MIXED"
    a = write_series(folder, n=5, names=[f"{i:03d}" for i in range(0, 10, 2)], seed=1)
    b = write_series(folder, n=6, origin=(-40.0, -30.0, 11.0), names=[f"{i:03d}" for i in range(1, 12, 2)], seed=2)
    report, _ = run(tmp_path / "export", tmp_path / "data")
    recs = sorted(accepted(report), key=lambda r: r.shape[2])
    assert [r.shape[2] for r in recs] == [5, 6]
    assert_world_match(tmp_path / "data" / recs[0].output, a)
    assert_world_match(tmp_path / "data" / recs[1].output, b)


def test_localizers_are_rejected_never_stacked_as_slices(tmp_path):
    folder = tmp_path / "export" / "ST1"
    main_uid = generate_uid()
    body = write_series(folder / "SE1", series_uid=main_uid, n=6)
    # A coronal scout inside the same SeriesInstanceUID, and a 2-slice series of its own.
    write_series(folder / "SE1", series_uid=main_uid, n=1, iop=CORONAL, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                 names=["SCOUT"], rows=8, cols=10)
    write_series(folder / "SE2", n=2, iop=CORONAL)
    report, _ = run(tmp_path / "export", tmp_path / "data")
    (rec,) = accepted(report)
    assert "mixed_orientations" in rec.warnings and rec.series_key.endswith(("-1", "-2"))
    assert_world_match(tmp_path / "data" / rec.output, body)
    assert sorted(r.reasons[0] for r in rejected(report)) == ["localizer", "localizer"]


def test_missing_slice_rejects_the_series_and_says_where(tmp_path):
    pos = [(-40.0, -30.0, 10.0 + 2.0 * k) for k in range(8) if k != 5]
    write_series(tmp_path / "export" / "S1", positions=pos)
    report, _ = run(tmp_path / "export", tmp_path / "data")
    (rec,) = report.series
    assert rec.status == "rejected" and rec.reasons == ["missing_slices"]
    assert "after slice 5 of 7" in rec.details["missing_slices"] and "about 1 missing" in rec.details["missing_slices"]
    assert not list((tmp_path / "data" / "images").glob("*.nii.gz"))


def _ramp(pts):
    # A linear function of world position: linear interpolation reproduces it exactly.
    return 3.0 * pts[..., 0] - 2.0 * pts[..., 1] + 5.0 * pts[..., 2] + 500.0


def _check_ramp(nifti: Path, atol: float):
    img = nib.load(str(nifti))
    data = np.asanyarray(img.dataobj).astype(float)
    i, j, k = np.meshgrid(*(np.arange(s) for s in data.shape), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    ras = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    lps = ras * np.array([-1.0, -1.0, 1.0])
    expected = _ramp(lps) - 1024.0
    np.testing.assert_allclose(data[ijk[:, 0], ijk[:, 1], ijk[:, 2]], expected, atol=atol)


def test_non_uniform_spacing_is_resampled_to_the_median_step(tmp_path):
    z = np.cumsum([10.0, 2.0, 2.0, 2.6, 1.4, 2.0, 2.0, 2.0]) - 2.0
    pos = [(-40.0, -30.0, zz) for zz in z]
    write_series(tmp_path / "export" / "S1", positions=pos, values=_ramp)
    report, _ = run(tmp_path / "export", tmp_path / "data")
    (rec,) = accepted(report)
    assert "non_uniform_spacing" in rec.warnings and "tolerance" in rec.details["non_uniform_spacing"]
    assert rec.spacing[2] == pytest.approx(2.0) and rec.shape[2] == 8
    _check_ramp(tmp_path / "data" / rec.output, atol=1.0)


def test_duplicate_positions_rejected_but_repeated_files_deduplicated(tmp_path):
    dup = [(-40.0, -30.0, 10.0 + 2.0 * k) for k in (0, 1, 2, 2, 3, 4)]
    write_series(tmp_path / "export" / "DUP", positions=dup)
    files = write_series(tmp_path / "export" / "OK", n=5, origin=(0, 0, 0))
    shutil.copytree(tmp_path / "export" / "OK", tmp_path / "export" / "OK_COPY")  # same instances twice
    report, _ = run(tmp_path / "export", tmp_path / "data")
    (bad,) = rejected(report)
    assert bad.reasons == ["duplicate_positions"]
    (good,) = accepted(report)
    assert "duplicate_files" in good.warnings and good.n_slices == 5
    assert_world_match(tmp_path / "data" / good.output, files)


def test_multi_echo_series_splits_by_echo(tmp_path):
    uid = generate_uid()
    e1 = write_series(tmp_path / "export" / "S", series_uid=uid, modality="MR", intercept=0, extra={"EchoNumbers": 1},
                      names=[f"a{i}" for i in range(6)], seed=1)
    e2 = write_series(tmp_path / "export" / "S", series_uid=uid, modality="MR", intercept=0, extra={"EchoNumbers": 2},
                      names=[f"b{i}" for i in range(6)], seed=2)
    report, _ = run(tmp_path / "export", tmp_path / "data")
    recs = sorted(accepted(report), key=lambda r: r.series_key)
    assert [r.series_key[-2:] for r in recs] == ["-1", "-2"]
    assert_world_match(tmp_path / "data" / recs[0].output, e1)
    assert_world_match(tmp_path / "data" / recs[1].output, e2)


def test_several_patients_in_one_series_rejected(tmp_path):
    uid = generate_uid()
    write_series(tmp_path / "export" / "S", series_uid=uid, n=3, names=["a", "b", "c"], patient_id="P1")
    write_series(tmp_path / "export" / "S", series_uid=uid, n=3, origin=(-40, -30, 16), names=["d", "e", "f"], patient_id="P2")
    report, _ = run(tmp_path / "export", tmp_path / "data")
    (rec,) = report.series
    assert "multiple_patients" in rec.reasons


def test_integer_storage_with_the_rescale_in_the_header_where_needed(tmp_path):
    ct = write_series(tmp_path / "export" / "CT", intercept=-1024)
    ct_frac = write_series(tmp_path / "export" / "CTF", slope=0.5, intercept=-1000, origin=(0, 0, 0))
    rwv = pydicom.Dataset()
    rwv.RealWorldValueSlope, rwv.RealWorldValueIntercept = 0.25, 3.0
    mr = write_series(tmp_path / "export" / "MR", modality="MR", slope=2, intercept=0, origin=(5, 5, 5),
                      extra={"RealWorldValueMappingSequence": pydicom.Sequence([rwv])})
    mr_plain = write_series(tmp_path / "export" / "MRP", modality="MR", slope=1, intercept=0, origin=(9, 9, 9))
    third = pydicom.Dataset()
    third.RealWorldValueSlope, third.RealWorldValueIntercept = 1 / 3, 0.1  # not exact in a float32 header
    mr_third = write_series(tmp_path / "export" / "MR3", modality="MR", origin=(14, 14, 14),
                            extra={"RealWorldValueMappingSequence": pydicom.Sequence([third])})
    report, _ = run(tmp_path / "export", tmp_path / "data")
    stored_as = {}
    for r in accepted(report):
        img = nib.load(str(tmp_path / "data" / r.output))
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)  # nibabel moves scl_* to the proxy
        stored_as[r.output] = (str(img.get_data_dtype()), slope, inter)
    got = list(stored_as.values())
    # CT in HU and plain MR: int16 without scaling; a fractional rescale that a float32 header holds exactly:
    # the stored integers with scl_slope/scl_inter (as dcm2niix); one it cannot hold exactly: float32
    assert sorted(got, key=repr) == sorted([("int16", 1.0, 0.0), ("int16", 0.5, -1000.0), ("int16", 0.25, 3.0),
                                            ("int16", 1.0, 0.0), ("float32", 1.0, 0.0)], key=repr)
    outs = {r.n_slices and r.output: r for r in accepted(report)}
    for files in (ct, ct_frac):
        (match,) = [o for o in outs if _same_series(tmp_path / "data" / o, files)]
        assert_world_match(tmp_path / "data" / match, files)
    (mr_out,) = [o for o in outs if stored_as[o][1] == 0.25]
    data = np.asanyarray(nib.load(str(tmp_path / "data" / mr_out)).dataobj)
    stored = pydicom.dcmread(mr[0]).pixel_array.T
    np.testing.assert_array_equal(data[:, :, 0], (stored * 0.25 + 3.0).astype(np.float32))  # RWV mapping wins over RescaleSlope
    (third_out,) = [o for o in outs if stored_as[o][0] == "float32"]
    data = np.asanyarray(nib.load(str(tmp_path / "data" / third_out)).dataobj)
    np.testing.assert_array_equal(data[:, :, 0], (pydicom.dcmread(mr_third[0]).pixel_array.T * (1 / 3) + 0.1).astype(np.float32))


def _same_series(nifti: Path, files) -> bool:
    img = nib.load(str(nifti))
    ipp = np.array([float(x) for x in pydicom.dcmread(files[0], stop_before_pixels=True).ImagePositionPatient])
    return bool(np.allclose(img.affine[:3, 3], ipp * np.array([-1, -1, 1]), atol=1e-3))


@pytest.mark.parametrize(
    "tsyntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian], ids=lambda t: t.name
)
def test_compressed_transfer_syntaxes_decode_to_the_same_values(tmp_path, tsyntax):
    kw = dict(n=4, rows=32, cols=32, modality="MR", intercept=0)
    if tsyntax == DeflatedExplicitVRLittleEndian:
        files = write_series(tmp_path / "export" / "S", **kw)
        for f in files:
            ds = pydicom.dcmread(f)
            ds.file_meta.TransferSyntaxUID = tsyntax
            ds.save_as(f, enforce_file_format=True)
    else:
        files = write_series(tmp_path / "export" / "S", transfer_syntax=tsyntax, **kw)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == tsyntax
    report, _ = run(tmp_path / "export", tmp_path / "data")
    (rec,) = accepted(report)
    assert_world_match(tmp_path / "data" / rec.output, files)


def test_unsupported_compression_is_a_report_entry(tmp_path):
    files = write_series(tmp_path / "export" / "S", n=4)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists
        ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 16])
        ds["PixelData"].VR = "OB"
        ds.save_as(f, enforce_file_format=True)
    report, _ = run(tmp_path / "export", tmp_path / "data")
    (rec,) = report.series
    assert rec.reasons == ["unsupported_compression"] and "MPEG2" in rec.details["unsupported_compression"]


def test_bad_and_non_image_files_are_report_entries_never_crashes(tmp_path):
    exp = tmp_path / "export"
    good = write_series(exp / "GOOD", n=4)
    trunc = write_series(exp / "TRUNC", n=5, origin=(0, 0, 0))
    victim = trunc[2]
    victim.write_bytes(victim.read_bytes()[:-60])  # pixel data cut short
    write_non_image(exp / "SR" / "1", "SR")
    write_non_image(exp / "RT" / "1", "RTSTRUCT")
    write_non_image(exp / "PR" / "1", "PR")
    (exp / "EMPTY").write_bytes(b"")
    (exp / "notes.txt").write_text("scanner export notes\n")
    (exp / "garbage.dcm").write_bytes(os.urandom(2000))
    bad_header = exp / "BADHDR"
    bad_header.write_bytes(good[0].read_bytes()[:200])  # cut inside the header
    report, _ = run(exp, tmp_path / "data")
    reasons = {s.path: s.reason for s in report.skipped}
    assert reasons["EMPTY"] == "empty_file"
    assert reasons["notes.txt"] == "not_dicom" and reasons["garbage.dcm"] == "not_dicom"
    assert reasons["SR/1"] == reasons["RT/1"] == reasons["PR/1"] == "non_image"
    assert reasons[f"TRUNC/{victim.name}"] == "truncated"
    assert reasons["BADHDR"] in ("corrupt", "truncated", "no_pixel_data")
    (ok,) = accepted(report)
    assert_world_match(tmp_path / "data" / ok.output, good)
    (gap,) = rejected(report)
    assert gap.reasons == ["missing_slices"]  # the truncated slice left a hole: not interpolated
    written = json.loads((tmp_path / "data" / "ingest_report.json").read_text())
    assert {s["path"] for s in written["skipped"]} == set(reasons)


# ---- real DICOM shipped in packages ------------------------------------------------------------

DICOMDIR_TREE = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"


def _tree_state(root: Path):
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_pydicom_dicomdir_tree(tmp_path):
    before = _tree_state(DICOMDIR_TREE)
    report, _ = run(DICOMDIR_TREE, tmp_path / "data")
    assert _tree_state(DICOMDIR_TREE) == before  # read in place, never modified
    (ct,) = accepted(report)
    ct5n = sorted((DICOMDIR_TREE / "98892001" / "CT5N").iterdir())
    assert ct.modality == "CT" and ct.shape == [16, 16, 5] and ct.spacing[2] == pytest.approx(2.5)
    assert_world_match(tmp_path / "data" / ct.output, ct5n)
    theirs = dcm2niix_convert(DICOMDIR_TREE / "98892001" / "CT5N", tmp_path / "niix")
    if theirs:
        assert_same_world(tmp_path / "data" / ct.output, next(iter(theirs.values())))
    reasons = sorted(r.reasons[0] for r in rejected(report))
    assert reasons.count("unsupported_modality") == 3  # three CR images
    assert "missing_slices" in reasons  # CT2: 4 slices with a 200 mm gap
    assert set(reasons) <= {"unsupported_modality", "missing_slices", "localizer"}
    skipped = {s.path: s.reason for s in report.skipped}
    assert skipped["DICOMDIR"] == "dicomdir" and skipped["README.txt"] == "not_dicom"
    detail = {s.path: s.detail for s in report.skipped}["DICOMDIR"]
    assert "listing 31 file(s)" in detail and "missing" not in detail


@pytest.mark.parametrize(
    "name",
    ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm",
     "MR_small_implicit.dcm", "MR_small_expb.dcm"],
)
def test_pydicom_compressed_files_decode_like_the_uncompressed_one(name):
    def volume(fname):
        slices = scan_file(get_testdata_file(fname))
        plan = check_series(SeriesCandidate(series_uid="x", slices=slices))
        return read_volume(plan), plan.affine

    ref, ref_aff = volume("MR_small.dcm")
    got, aff = volume(name)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(aff, ref_aff)


def test_pydicom_truncated_and_non_image_files():
    assert scan_file(get_testdata_file("MR_truncated.dcm")).reason == "truncated"
    assert scan_file(get_testdata_file("test-SR.dcm")).reason == "non_image"
    assert scan_file(get_testdata_file("liver_1frame.dcm")).reason == "dicom_seg"
    assert scan_file(get_testdata_file("README.txt", download=False) or __file__).reason == "not_dicom"


NIBABEL_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"


def test_nibabel_rescale_file_gives_the_rescaled_mr_values_as_integers():
    slices = scan_file(str(NIBABEL_DATA / "decimal_rescale.dcm"))
    plan = check_series(SeriesCandidate(series_uid="x", slices=slices))
    vol = read_volume(plan)
    ds = pydicom.dcmread(NIBABEL_DATA / "decimal_rescale.dcm")
    assert vol.dtype == np.int16  # RescaleSlope 2, RescaleIntercept -4096: integral, so stored as integers
    np.testing.assert_array_equal(vol[:, :, 0], ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept))


@pytest.mark.skipif(not (NIBABEL_DATA / "philips_mprage.dcm.gz").exists(), reason="nibabel test data not shipped")
def test_enhanced_multiframe_mr_matches_dcm2niix(tmp_path):
    exp = tmp_path / "export" / "MF"
    exp.mkdir(parents=True)
    (exp / "IM1").write_bytes(gzip.decompress((NIBABEL_DATA / "philips_mprage.dcm.gz").read_bytes()))
    report, _ = run(tmp_path / "export", tmp_path / "data")
    (rec,) = accepted(report)
    assert rec.modality == "MR" and rec.n_slices == 176
    theirs = dcm2niix_convert(tmp_path / "export", tmp_path / "niix")
    assert theirs, "dcm2niix wrote no NIfTI"
    # nibabel ships this file with its pixel data zeroed, so only the grids can be compared: every corner
    # voxel centre of ours must be a voxel centre of dcm2niix's volume, and the grids must have one size.
    a, b = nib.load(str(tmp_path / "data" / rec.output)), nib.load(str(next(iter(theirs.values()))))
    assert sorted(a.shape) == sorted(b.shape[:3])
    corners = np.array([[i, j, k] for i in (0, a.shape[0] - 1) for j in (0, a.shape[1] - 1) for k in (0, a.shape[2] - 1)], float)
    world = corners @ a.affine[:3, :3].T + a.affine[:3, 3]
    inv = np.linalg.inv(b.affine)
    ijk_b = world @ inv[:3, :3].T + inv[:3, 3]
    assert np.max(np.abs(ijk_b - np.rint(ijk_b))) < 1e-2
    assert np.all(np.rint(ijk_b) >= 0) and np.all(np.rint(ijk_b) < np.array(b.shape[:3]))


@pytest.mark.parametrize("signed", [False, True])
def test_pixels_read_from_the_file_equal_pydicoms_with_unused_high_bits(tmp_path, signed):
    # 12 bits stored in 16 allocated, with junk in the 4 unused bits: pydicom masks (unsigned) or
    # sign-extends (signed) them; the direct read must give the same values.
    files = write_series(tmp_path / "S", n=4, rows=6, cols=7, intercept=0)
    rng = np.random.default_rng(3)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
        ds.PixelData = rng.integers(0, 1 << 16, size=(6, 7), dtype=np.uint16).tobytes()
        ds.save_as(f, enforce_file_format=True)
    slices = [s for f in files for s in scan_file(str(f))]
    assert all(s.data_offset is not None for s in slices)  # the direct path is the one under test
    plan = check_series(SeriesCandidate(series_uid="x", slices=slices))
    vol = read_volume(plan)
    for k, s in enumerate(plan.slices):
        np.testing.assert_array_equal(vol[:, :, k], pydicom.dcmread(s.path).pixel_array.T)
