"""nnU-Net raw datasets ingest into the same manifest and report as DICOM exports: keyed case ids, images
re-encoded with the same world geometry and no header text, labels checked in world space, and clear
errors for a dataset.json medmtl cannot use."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmtl.ingest.run import IngestError, ingest
from medmtl.data.manifest import read_manifest
from medmtl.ingest.pseudonym import SECRET_FILE_NAME

# Case identifiers that look like hospital ids, and header text with patient data: neither may pass.
CASES = ["MRN0048213", "MRN0077120", "MRN0099314"]
HEADER_PHI = "QUIXOTE^ESMERALDA 19470314"


def _affine(i: int) -> np.ndarray:
    """An oblique RAS affine with anisotropic voxels, different per case."""
    c, s = np.cos(0.2 + 0.1 * i), np.sin(0.2 + 0.1 * i)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 0.9, 2.5])
    aff[:3, 3] = [-40.0 + i, 20.0, -60.0 - 3 * i]
    return aff


def _save(data, affine, path: Path, *, phi: bool = True):
    img = nib.Nifti1Image(data, affine)
    if phi:
        img.header["descrip"] = HEADER_PHI.encode()
        img.header["aux_file"] = b"MRN0048213"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def make_dataset(root: Path, channels=None, labels=None, n_train=3) -> dict:
    """Write a small nnU-Net v2 raw dataset; return {case: (image data per channel, label, affine)}."""
    channels = channels or {"0": "CT"}
    labels = labels or {"background": 0, "liver": 1, "spleen": 2}
    rng = np.random.default_rng(0)
    truth = {}
    for i, case in enumerate(CASES[:n_train]):
        shape = (12, 10, 6 + i)
        lab = np.zeros(shape, np.uint8)
        lab[2:6, 3:7, 1:4] = 1
        lab[7:10, 1:4, 2:5] = 2
        images = {}
        for ch in channels:
            img = rng.integers(-1000, 1000, size=shape).astype(np.int16)
            _save(img, _affine(i), root / "imagesTr" / f"{case}_{int(ch):04d}.nii.gz")
            images[int(ch)] = img
        _save(lab, _affine(i), root / "labelsTr" / f"{case}.nii.gz")
        truth[case] = (images, lab, _affine(i))
    test_img = rng.normal(size=(9, 9, 5)).astype(np.float64)
    for ch in channels:
        _save(test_img, _affine(5), root / "imagesTs" / f"TEST001_{int(ch):04d}.nii.gz")
    truth["TEST001"] = ({int(ch): test_img.astype(np.float32) for ch in channels}, None, _affine(5))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": channels, "labels": labels, "numTraining": n_train, "file_ending": ".nii.gz",
        "name": "Liver", "description": "test",
    }))
    return truth


def _key(out: Path) -> bytes:
    return bytes.fromhex((out / SECRET_FILE_NAME).read_text().strip())


def _hmac(key: bytes, value: str, prefix: str) -> str:
    return prefix + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:12]


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "Dataset003_Liver"
    return root, make_dataset(root)


def test_nnunet_dataset_lands_in_the_manifest_voxel_for_voxel(dataset, tmp_path):
    root, truth = dataset
    out = tmp_path / "data"
    report = ingest(root, out, progress=False)
    assert report.source == "nnunet" and report.n_accepted == 4 and report.n_rejected == 0
    key = _key(out)
    entries = {e.case_id: e for e in read_manifest(out)}
    for case, (images, lab, affine) in truth.items():
        e = entries[_hmac(key, f"nnunet:Dataset003_Liver:{case}", "case-")]  # keyed pseudonym of the case id
        assert e.series_key == _hmac(key, f"nnunet:Dataset003_Liver:{case}:0", "series-")
        assert e.modality == "CT" and e.n_slices == images[0].shape[2]
        img = nib.load(str(out / e.image))
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)  # same world geometry
        np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), images[0])
        assert img.get_data_dtype() == images[0].dtype
        np.testing.assert_allclose(e.spacing, [0.8, 0.9, 2.5], rtol=1e-5)
        if lab is None:
            assert e.label is None and e.label_source is None
        else:
            assert e.label_source == "nnunet"
            np.testing.assert_array_equal(np.asanyarray(nib.load(str(out / e.label)).dataobj), lab)


def test_no_case_identifier_or_header_text_passes(dataset, tmp_path):
    root, _ = dataset
    (root / "imagesTr" / "notes_MRN0048213.txt").write_text("x")  # a stray file named after a patient
    out = tmp_path / "data"
    report = ingest(root, out, progress=False)
    assert [s.reason for s in report.skipped] == ["not_nnunet_image"]
    assert report.skipped[0].path.startswith("imagesTr/file-")
    for p in out.rglob("*"):
        if p.is_file() and p.name != SECRET_FILE_NAME:
            data = p.read_bytes()
            text = (data + (gzip.decompress(data) if p.name.endswith(".gz") else b"")).decode("latin-1")
            for needle in CASES + ["QUIXOTE", "MRN00", "TEST001"]:
                assert needle not in text and needle not in p.name, (needle, p.relative_to(out))


def test_label_checked_in_world_space_and_files_without_partner_reported(dataset, tmp_path):
    root, truth = dataset
    images, lab, affine = truth[CASES[1]]
    moved = affine.copy()
    moved[:3, 3] += 0.5 * affine[:3, 0]  # half a voxel along the first axis
    _save(lab, moved, root / "labelsTr" / f"{CASES[1]}.nii.gz")
    _, lab0, aff0 = truth[CASES[0]]
    flip_x = np.array([[-1, 0, 0, lab0.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(lab0[::-1], aff0 @ flip_x), root / "labelsTr" / f"{CASES[0]}.nii.gz")  # same grid, x reversed
    (root / "imagesTr" / f"{CASES[2]}_0000.nii.gz").unlink()  # label without image
    out = tmp_path / "data"
    report = ingest(root, out, progress=False)
    rejected = [r for r in report.series if r.status == "rejected"]
    assert [r.reasons for r in rejected] == [["label_mismatch"]]
    assert "0.500 voxels" in rejected[0].details["label_mismatch"] and "not resampled" in rejected[0].details["label_mismatch"]
    assert [s.reason for s in report.skipped] == ["label_without_image"]
    key = _key(out)
    e = {x.case_id: x for x in read_manifest(out)}[_hmac(key, f"nnunet:Dataset003_Liver:{CASES[0]}", "case-")]
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out / e.label)).dataobj), truth[CASES[0]][1])


def test_mr_channels_each_become_an_image_and_other_channels_are_listed(tmp_path):
    root = tmp_path / "Dataset010_Prostate"
    truth = make_dataset(root, channels={"0": "T2", "1": "ADC", "2": "PET"}, n_train=1)
    out = tmp_path / "data"
    report = ingest(root, out, progress=False)
    entries = read_manifest(out)
    assert sorted(e.modality for e in entries) == ["MR"] * 4  # 2 channels x (1 train + 1 test case)
    assert sorted(s.reason for s in report.skipped) == ["unsupported_channel"] * 2
    case = _hmac(_key(out), f"nnunet:Dataset010_Prostate:{CASES[0]}", "case-")
    mine = [e for e in entries if e.case_id == case]
    assert len(mine) == 2 and len({e.series_key for e in mine}) == 2
    for e in mine:
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(out / e.label)).dataobj), truth[CASES[0]][1])


def test_dataset_json_naming_neither_ct_nor_mr_is_a_clear_error(tmp_path):
    root = tmp_path / "Dataset020_Pet"
    make_dataset(root, channels={"0": "PET"}, n_train=1)
    with pytest.raises(IngestError, match=r"dataset\.json: key 'channel_names' names no CT or MR channel \('PET'\)"):
        ingest(root, tmp_path / "data", progress=False)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"a": 1}, "file_ending": ".png"}))
    with pytest.raises(IngestError, match=r"dataset\.json: key 'file_ending' is '\.png'"):
        ingest(root, tmp_path / "data", progress=False)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    with pytest.raises(IngestError, match=r"dataset\.json: key 'labels' is missing"):
        ingest(root, tmp_path / "data", progress=False)


def test_labels_mapped_to_configured_names_and_undeclared_values_rejected(tmp_path):
    root = tmp_path / "Dataset004_Spleen"
    truth = make_dataset(root, labels={"background": 0, "Liver": 1, "spleen": 2}, n_train=2)
    images, lab, affine = truth[CASES[1]]
    bad = lab.copy()
    bad[0, 0, 0] = 7  # a value dataset.json does not declare
    _save(bad, affine, root / "labelsTr" / f"{CASES[1]}.nii.gz")
    out = tmp_path / "data"
    names = {"ct": {1: "spleen", 2: "liver"}}
    report = ingest(root, out, progress=False, label_names=names)
    (rej,) = [r for r in report.series if r.status == "rejected"]
    assert rej.reasons == ["label_values"] and "[7]" in rej.details["label_values"]
    e = {x.case_id: x for x in read_manifest(out)}[_hmac(_key(out), f"nnunet:Dataset004_Spleen:{CASES[0]}", "case-")]
    got = np.asanyarray(nib.load(str(out / e.label)).dataobj)
    np.testing.assert_array_equal(got, np.choose(truth[CASES[0]][1], [0, 2, 1]))  # liver 1 -> 2, spleen 2 -> 1
    with pytest.raises(IngestError, match=r"key 'labels'.*'Liver'"):  # only spleen matches: ambiguous
        ingest(root, tmp_path / "data2", progress=False, label_names={"CT": {1: "spleen", 2: "kidney"}})


def test_rerun_does_no_work_and_changed_label_is_redone(dataset, tmp_path):
    root, truth = dataset
    out = tmp_path / "data"
    ingest(root, out, progress=False)
    again = ingest(root, out, progress=False)
    assert {r.action for r in again.series} == {"unchanged"}
    images, lab, affine = truth[CASES[0]]
    _save(np.where(lab == 1, 2, lab).astype(np.uint8), affine, root / "labelsTr" / f"{CASES[0]}.nii.gz")
    third = ingest(root, out, progress=False)
    assert sorted(r.action for r in third.series) == ["unchanged"] * 3 + ["written"]


def test_broken_images_are_report_entries_not_crashes(dataset, tmp_path):
    root, truth = dataset
    (root / "imagesTr" / f"{CASES[0]}_0000.nii.gz").write_bytes(b"")  # zero-length
    p = root / "imagesTr" / f"{CASES[1]}_0000.nii.gz"
    p.write_bytes(p.read_bytes()[:200])  # truncated gzip
    images, lab, affine = truth[CASES[2]]
    img = nib.Nifti1Image(images[0], affine)
    shifted = affine.copy()
    shifted[0, 3] += 5.0  # qform 5 mm away from the sform: readers would disagree on where the image is
    img.set_qform(shifted, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, root / "imagesTr" / f"{CASES[2]}_0000.nii.gz")
    report = ingest(root, tmp_path / "data", progress=False)
    reasons = sorted(r for s in report.series for r in s.reasons)
    assert reasons == ["qform_sform_mismatch", "unreadable_image", "unreadable_image"]
    assert report.n_accepted == 1


def test_labels_dir_with_an_nnunet_dataset_is_refused(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(IngestError, match="labelsTr"):
        ingest(root, tmp_path / "data", labels_dir=root / "labelsTr", progress=False)
