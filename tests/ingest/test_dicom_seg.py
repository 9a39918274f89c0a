"""DICOM SEG objects inside an export become the labels of the series they reference: placed by world
position, values by segment name or number, overlaps and conflicts resolved as documented, mismatches
reported, and none of the SEG's patient data passing ingest."""

from __future__ import annotations

import copy
import gzip
import os
import shutil
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import pack_bits

sys.path.insert(0, os.path.dirname(__file__))
from conftest_ingest import phi_strings, write_series  # noqa: E402

from medmtl.ingest.common import SkippedFile  # noqa: E402
from medmtl.ingest.run import ingest  # noqa: E402
from medmtl.data.manifest import read_manifest  # noqa: E402
from medmtl.ingest.pseudonym import SECRET_FILE_NAME, Pseudonymizer  # noqa: E402
from medmtl.synth import LABELS, synthesize_exports  # noqa: E402

SEG_AUTHOR = "SEGMENTER^PERSEPHONE"  # planted in every SEG: an annotator's name must not pass either
_CATEGORY = hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure")
_ORGAN = hd.sr.CodedConcept("113343008", "SCT", "Organ")


def _sources(files) -> list[pydicom.Dataset]:
    """Source datasets sorted along the slice normal (the order of the synthetic masks' third axis)."""
    dss = [pydicom.dcmread(f) for f in files]
    for d in dss:  # write_series leaves out some type-2 elements that highdicom copies
        for k in ("PatientSex", "StudyDate", "StudyTime", "StudyID", "ReferringPhysicianName"):
            if k not in d:
                setattr(d, k, "")
    iop = np.array([float(x) for x in dss[0].ImageOrientationPatient])
    nrm = np.cross(iop[:3], iop[3:])
    return sorted(dss, key=lambda d: float(np.dot(nrm, [float(x) for x in d.ImagePositionPatient])))


def make_seg(sources, mask, segments: dict[int, str], *, seg_type="BINARY", shuffle_seed=None) -> hd.seg.Segmentation:
    """A SEG of ``mask`` drawn on ``sources`` (sorted along the normal).

    ``mask`` is ``(cols, rows, slices)`` with segment numbers as values, or ``(cols, rows, slices, segments)``
    booleans (overlaps allowed).

    With ``shuffle_seed`` the frames are shuffled in the file afterwards, so that only their per-frame
    positions say where they belong.
    """
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=name, segmented_property_category=_CATEGORY,
            segmented_property_type=_ORGAN, algorithm_type="MANUAL",
        )
        for n, name in sorted(segments.items())
    ]
    if mask.ndim == 4:  # one boolean channel per segment, may overlap
        pixels = np.ascontiguousarray(np.transpose(mask, (2, 1, 0, 3)))  # (frames, rows, cols, segments)
    else:
        pixels = np.ascontiguousarray(np.transpose(mask, (2, 1, 0)))  # (frames, rows, cols)
        if seg_type == "BINARY":
            pixels = np.stack([pixels == n for n in sorted(segments)], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=seg_type,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=300,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medmtl-tests",
        manufacturer_model_name="seg-writer", software_versions="1", device_serial_number="1",
        content_creator_name=SEG_AUTHOR,
    )
    if shuffle_seed is not None:
        frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
        perm = np.random.default_rng(shuffle_seed).permutation(len(frames))
        seg.PerFrameFunctionalGroupsSequence = [seg.PerFrameFunctionalGroupsSequence[i] for i in perm]
        seg.PixelData = pack_bits(frames[perm].ravel()) if seg_type == "BINARY" else frames[perm].tobytes()
    return seg


def _series_key(out: Path, uid: str) -> str:
    return Pseudonymizer(bytes.fromhex((out / SECRET_FILE_NAME).read_text().strip())).series_key(uid)


# --------------------------------------------------------------------------------------------------
# the acceptance test: synthetic export + SEGs, no LABEL_DIR


@pytest.fixture(scope="module")
def seg_export(tmp_path_factory):
    """Synthetic export (1 CT, 3 MR with one oblique) with a SEG per image series and no NIfTI labels.

    CT: segment numbers are the label values, frames shuffled in the file. MR: segment numbers permuted
    against the label values, so only the segment names can give the right values.
    """
    root = tmp_path_factory.mktemp("segsynth")
    res = synthesize_exports(root, n_ct=1, n_mr=3, seed=7, ct_matrix=32, mr_matrix=32)
    expected = {}
    perm = {1: 3, 2: 1, 3: 4, 4: 2}  # label value -> MR segment number
    for i, s in enumerate(x for x in res.series if not x.is_localizer):
        mask = np.asarray(nib.load(str(s.label_path)).dataobj)
        sources = _sources(sorted(s.dicom_dir.iterdir()))
        if s.modality == "CT":
            seg = make_seg(sources, mask, dict(LABELS), shuffle_seed=i)
        else:
            relabelled = np.zeros_like(mask)
            for value, number in perm.items():
                relabelled[mask == value] = number
            seg = make_seg(sources, relabelled, {perm[v]: name.replace("_", " ").title() for v, name in LABELS.items()})
        seg_dir = s.dicom_dir.parent / f"SEG{i:05d}"
        seg_dir.mkdir()
        seg.save_as(seg_dir / "IM000000", enforce_file_format=True)
        expected[s.series_uid] = mask
    out = tmp_path_factory.mktemp("segdata")
    report = ingest(res.export_dir, out, progress=False, workers=2, label_names={"CT": LABELS, "mr": LABELS})
    return dict(res=res, out=out, report=report, expected=expected)


def test_seg_becomes_the_label_voxel_for_voxel(seg_export):
    out, report = seg_export["out"], seg_export["report"]
    entries = {e.series_key: e for e in read_manifest(out)}
    assert len(entries) == 4 and report.n_accepted == 4
    assert not [s for s in report.skipped if s.reason.startswith("seg")]  # every SEG was used
    for uid, mask in seg_export["expected"].items():
        e = entries[_series_key(out, uid)]
        assert e.label_source == "dicom_seg"
        lab = nib.load(str(out / e.label))
        assert lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(lab.affine, nib.load(str(out / e.image)).affine)
        np.testing.assert_array_equal(np.asanyarray(lab.dataobj), mask)
        assert set(np.unique(mask)) >= {0, 1}  # the comparison is not between two empty masks


def test_seg_mapping_rule_is_reported(seg_export):
    by_mod = {r.modality: r for r in seg_export["report"].series if r.status == "accepted"}
    assert "mapped by name" in by_mod["MR"].details["label_source"]
    # MR segment numbers were permuted against the values: segment 3 is the liver, segment 1 the spleen.
    assert by_mod["MR"].details["label_source"].endswith(
        "1 'Spleen' -> 2, 2 'Kidney Right' -> 4, 3 'Liver' -> 1, 4 'Kidney Left' -> 3"
    )
    assert "labels_by_number" not in by_mod["CT"].warnings


def test_no_patient_data_from_the_seg_headers(seg_export):
    out, res = seg_export["out"], seg_export["res"]
    needles = res.phi_strings() + res.uid_strings() + [SEG_AUTHOR, "PERSEPHONE"]
    needles += [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in res.export_dir.rglob("SEG*/*")]
    for p in out.rglob("*"):
        if not p.is_file() or p.name == SECRET_FILE_NAME:
            continue
        data = p.read_bytes()
        text = (data + (gzip.decompress(data) if p.name.endswith(".gz") else b"")).decode("latin-1").upper()
        for needle in needles:
            assert needle.upper() not in text, f"{needle!r} in {p.relative_to(out)}"


def test_rerun_with_seg_does_no_work(seg_export):
    res, out = seg_export["res"], seg_export["out"]
    report = ingest(res.export_dir, out, progress=False, workers=2, label_names={"CT": LABELS, "MR": LABELS})
    assert {r.action for r in report.series if r.status == "accepted"} == {"unchanged"}


# --------------------------------------------------------------------------------------------------
# small series: mismatches, conflicts, overlaps


def _series(tmp_path, **kw):
    files = write_series(tmp_path / "export" / "S", n=6, rows=8, cols=10, **kw)
    sources = _sources(files)
    mask = np.zeros((10, 8, 6), np.uint8)
    mask[2:7, 1:5, 1:5] = 1
    mask[5:9, 3:7, 2:6] = 2  # overlaps segment 1 where both are set below
    return sources, mask


def _save(seg, tmp_path, name="SEG"):
    path = tmp_path / "export" / name / "IM000001"
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    "shift, expected",
    [
        ((0.35, 0.0, 0.0), "pixels off the image's voxel centres"),  # half a column (0.7 mm) in x
        ((0.0, 0.0, 1.0), "from the nearest image slice"),  # half a slice step (2 mm) along the normal
        ((7.0, 0.0, 0.0), "extends outside"),  # ten whole columns: on the grid, but off the image
    ],
)
def test_seg_off_the_image_grid_is_a_label_mismatch(tmp_path, shift, expected):
    sources, mask = _series(tmp_path)
    moved = [copy.deepcopy(d) for d in sources]
    for d in moved:
        d.ImagePositionPatient = [f"{float(x) + s:.6f}" for x, s in zip(d.ImagePositionPatient, shift)]
    _save(make_seg(moved, mask, {1: "liver", 2: "spleen"}), tmp_path)
    report = ingest(tmp_path / "export", tmp_path / "data", progress=False)
    (rec,) = report.series
    assert rec.status == "rejected" and rec.reasons == ["label_mismatch"]
    detail = rec.details["label_mismatch"]
    assert expected in detail and "SEG/IM000001" in detail and "not resampled" in detail
    assert not list((tmp_path / "data" / "images").iterdir())


def test_seg_in_another_frame_of_reference_is_a_label_mismatch(tmp_path):
    sources, mask = _series(tmp_path)
    other = [copy.deepcopy(d) for d in sources]
    for_uid = pydicom.uid.generate_uid()
    for d in other:
        d.FrameOfReferenceUID = for_uid
    _save(make_seg(other, mask, {1: "liver", 2: "spleen"}), tmp_path)
    (rec,) = ingest(tmp_path / "export", tmp_path / "data", progress=False).series
    assert rec.reasons == ["label_mismatch"] and "FrameOfReferenceUID" in rec.details["label_mismatch"]


def test_overlapping_segments_higher_number_wins(tmp_path):
    sources, _ = _series(tmp_path)
    binary = np.zeros((10, 8, 6, 2), bool)  # (cols, rows, slices, segments)
    binary[2:7, 1:5, 1:5, 0] = True
    binary[5:9, 3:7, 2:6, 1] = True
    n_overlap = int(np.sum(binary[..., 0] & binary[..., 1]))
    assert n_overlap > 0
    _save(make_seg(sources, binary, {1: "liver", 2: "spleen"}), tmp_path)
    (rec,) = ingest(tmp_path / "export", tmp_path / "data", progress=False).series
    lab = np.asanyarray(nib.load(str(tmp_path / "data" / rec.label)).dataobj)
    expected = np.zeros(binary.shape[:3], np.uint8)
    expected[binary[..., 0]] = 1
    expected[binary[..., 1]] = 2  # segment 2 wins where both are set
    np.testing.assert_array_equal(lab, expected)
    assert "seg_overlap" in rec.warnings and rec.details["seg_overlap"].startswith(f"{n_overlap} voxel")


def test_label_dir_mask_wins_over_seg_and_the_report_says_so(tmp_path):
    sources, mask = _series(tmp_path)
    _save(make_seg(sources, mask, {1: "liver", 2: "spleen"}), tmp_path)
    ref = ingest(tmp_path / "export", tmp_path / "ref", progress=False)
    affine = nib.load(str(tmp_path / "ref" / ref.series[0].output)).affine
    labels = tmp_path / "labels"
    labels.mkdir()
    nifti_mask = (mask > 0).astype(np.uint8) * 3
    nib.save(nib.Nifti1Image(nifti_mask, affine), labels / f"{sources[0].SeriesInstanceUID}.nii.gz")
    report = ingest(tmp_path / "export", tmp_path / "data", labels_dir=labels, progress=False)
    (rec,) = report.series
    assert rec.label_source == "label_dir" and "seg_superseded" in rec.warnings
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "data" / rec.label)).dataobj), nifti_mask)
    (skip,) = report.skipped
    assert skip.reason == "seg_superseded" and skip.path == "SEG/IM000001"
    assert read_manifest(tmp_path / "data")[0].label_source == "label_dir"


def test_two_segs_for_one_series_reject_it_with_the_way_out(tmp_path):
    sources, mask = _series(tmp_path)
    _save(make_seg(sources, mask, {1: "liver", 2: "spleen"}), tmp_path, "SEGA")
    _save(make_seg(sources, mask, {1: "liver", 2: "spleen"}), tmp_path, "SEGB")
    (rec,) = ingest(tmp_path / "export", tmp_path / "data", progress=False).series
    assert rec.reasons == ["multiple_seg"] and "LABEL_DIR" in rec.details["multiple_seg"]


def test_partial_name_match_is_refused_but_no_match_falls_back_to_numbers(tmp_path):
    sources, mask = _series(tmp_path)
    _save(make_seg(sources, mask, {1: "Liver", 2: "Tumour"}), tmp_path)
    names = {"CT": {1: "liver", 2: "spleen"}}
    (rec,) = ingest(tmp_path / "export", tmp_path / "a", progress=False, label_names=names).series
    assert rec.reasons == ["unknown_label_names"] and "'Tumour'" in rec.details["unknown_label_names"]
    shutil.rmtree(tmp_path / "export" / "SEG")
    _save(make_seg(sources, mask, {1: "Lesion", 2: "Tumour"}), tmp_path)
    (rec,) = ingest(tmp_path / "export", tmp_path / "b", progress=False, label_names=names).series
    assert rec.status == "accepted" and "labels_by_number" in rec.warnings
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "b" / rec.label)).dataobj), mask)


def test_labelmap_seg(tmp_path):
    sources, mask = _series(tmp_path)
    try:
        seg = make_seg(sources, mask, {1: "liver", 2: "spleen"}, seg_type="LABELMAP")
    except (ValueError, TypeError, NotImplementedError) as e:  # pragma: no cover - older highdicom
        pytest.skip(f"highdicom cannot write LABELMAP SEG: {e}")
    _save(seg, tmp_path)
    (rec,) = ingest(tmp_path / "export", tmp_path / "data", progress=False).series
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "data" / rec.label)).dataobj), mask)


def test_gantry_tilted_series_gets_the_seg_with_the_same_correction(tmp_path):
    # Positions sheared along y by 0.3 mm per slice: the SEG is drawn on the sheared source slices, and
    # its mask must follow the image onto the orthogonal output grid (nearest neighbour).
    pos = [(-40.0, -30.0 + 0.3 * k, 10.0 + 2.0 * k) for k in range(6)]
    files = write_series(tmp_path / "export" / "S", n=6, rows=8, cols=10, positions=pos)
    sources = _sources(files)
    mask = np.zeros((10, 8, 6), np.uint8)
    mask[2:7, 1:6, :] = 1
    _save(make_seg(sources, mask, {1: "liver"}), tmp_path)
    (rec,) = ingest(tmp_path / "export", tmp_path / "data", progress=False).series
    assert rec.status == "accepted" and "gantry_tilt" in rec.warnings and rec.label_source == "dicom_seg"
    lab = nib.load(str(tmp_path / "data" / rec.label))
    # World check: every labelled output voxel lies inside the labelled source region (world y range).
    ijk = np.argwhere(np.asanyarray(lab.dataobj) == 1)
    assert len(ijk) == mask.sum()  # shifted by whole voxels (nearest): no voxel lost or invented
    world = ijk @ lab.affine[:3, :3].T + lab.affine[:3, 3]
    y_lps = -world[:, 1]
    k = ijk[:, 2]
    src_y0 = -30.0 + 0.3 * k + 1 * 0.8  # first labelled row of slice k in LPS (row spacing 0.8 mm)
    assert np.all(y_lps >= src_y0 - 0.4 - 1e-6) and np.all(y_lps <= src_y0 + 4 * 0.8 + 0.4 + 1e-6)


def test_gantry_tilted_seg_reaching_the_slice_edges_loses_nothing(tmp_path):
    # 15 degrees: the last slice moves 4.7 rows, so the grid grows; a SEG covering whole slices must keep
    # every marked pixel, in world space next to the image data and nowhere in the air margin.
    pos = [(-40.0, -30.0 + 2.0 * k * np.tan(np.radians(15.0)), 10.0 + 2.0 * k) for k in range(6)]
    files = write_series(tmp_path / "export" / "S", n=6, rows=8, cols=10, positions=pos,
                         values=lambda p: 1500.0 + 10.0 * p[..., 2])  # tissue everywhere: above the air fill
    mask = np.ones((10, 8, 6), np.uint8)
    mask[:, ::2, :] = 2  # alternate rows, so a row shifted by one would show
    _save(make_seg(_sources(files), mask, {1: "liver", 2: "spleen"}), tmp_path)
    (rec,) = ingest(tmp_path / "export", tmp_path / "data", progress=False).series
    assert rec.status == "accepted" and rec.label_source == "dicom_seg" and rec.shape[1] > 8
    img, lab = (nib.load(str(tmp_path / "data" / p)) for p in (rec.output, rec.label))
    ldata = np.asanyarray(lab.dataobj)
    assert np.array_equal(np.bincount(ldata.ravel(), minlength=3)[1:], np.bincount(mask.ravel(), minlength=3)[1:])
    np.testing.assert_array_equal(ldata > 0, np.asanyarray(img.dataobj) != -1024)
    inv = np.linalg.inv(lab.affine)
    for k, d in enumerate(_sources(files)):
        ipp = np.array([float(x) for x in d.ImagePositionPatient])
        r, c = np.meshgrid(np.arange(8), np.arange(10), indexing="ij")
        lps = ipp + c[..., None] * 0.7 * np.array([1.0, 0, 0]) + r[..., None] * 0.8 * np.array([0, 1.0, 0])
        ras = lps.reshape(-1, 3) * np.array([-1.0, -1.0, 1.0])
        near = np.rint(ras @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        np.testing.assert_array_equal(ldata[tuple(near.T)], mask[:, :, k].T.ravel())


def test_pydicom_seg_without_its_series_is_listed_not_used(tmp_path):
    write_series(tmp_path / "export" / "S", n=4)
    (tmp_path / "export" / "SEG").mkdir()
    shutil.copy(get_testdata_file("liver_1frame.dcm"), tmp_path / "export" / "SEG" / "seg.dcm")
    report = ingest(tmp_path / "export", tmp_path / "data", progress=False)
    assert report.n_accepted == 1 and report.series[0].label is None
    assert report.skipped == [SkippedFile("SEG/seg.dcm", "seg_without_series", "DICOM SEG that references no series of this export")]
    assert all(s not in (tmp_path / "data" / "ingest_report.json").read_text() for s in phi_strings())


def test_seg_removed_from_the_export_removes_the_label_on_rerun(tmp_path):
    sources, mask = _series(tmp_path)
    _save(make_seg(sources, mask, {1: "liver", 2: "spleen"}), tmp_path)
    out = tmp_path / "data"
    first = ingest(tmp_path / "export", out, progress=False)
    assert first.series[0].label_source == "dicom_seg"
    shutil.rmtree(tmp_path / "export" / "SEG")
    (rec,) = ingest(tmp_path / "export", out, progress=False).series
    assert rec.action == "written" and rec.label is None
    assert read_manifest(out)[0].label is None and not list((out / "labels").iterdir())
