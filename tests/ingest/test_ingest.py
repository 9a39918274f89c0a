"""End-to-end ingest behaviour users rely on: geometry against the generator and dcm2niix, labels, PHI,
an untouched export, re-runs that do no work, crash safety, and clear errors for bad input."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import logging
import os
import stat
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest_ingest import assert_same_world, dcm2niix_convert, phi_strings, write_non_image, write_series  # noqa: E402

import medmtl.ingest.run as ingest_mod  # noqa: E402
import medmtl.nifti as nifti_mod  # noqa: E402
from medmtl.ingest.run import IngestError, ingest  # noqa: E402
from medmtl.data.manifest import read_manifest  # noqa: E402
from medmtl.ingest.pseudonym import SECRET_FILE_NAME  # noqa: E402

synth = pytest.importorskip("medmtl.synth")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A synthetic export (2 CT with localizers, 3 MR, one oblique) plus a few planted extras."""
    root = tmp_path_factory.mktemp("synth")
    result = synth.synthesize_exports(root, n_ct=2, n_mr=3, seed=7, ct_matrix=32, mr_matrix=32)
    write_non_image(result.export_dir / "DICOM" / "PA000000" / "ST000000" / "SR000001" / "IM000000", "SR")
    (result.export_dir / "DICOM" / "EMPTY").write_bytes(b"")
    return result


def _tree(root: Path):
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ingested(export, tmp_path_factory):
    """Ingest the synthetic export once, capturing everything logged."""
    out = tmp_path_factory.mktemp("data")
    before = _tree(export.root)
    handler_stream = []

    class Grab(logging.Handler):
        def emit(self, record):
            handler_stream.append(self.format(record))

    h = Grab(level=logging.DEBUG)
    root_log = logging.getLogger()
    old_level = root_log.level
    root_log.addHandler(h)
    root_log.setLevel(logging.DEBUG)
    try:
        report = ingest(export.export_dir, out, labels_dir=export.labels_dir, progress=False, workers=2)
    finally:
        root_log.removeHandler(h)
        root_log.setLevel(old_level)
    return dict(out=out, report=report, before=before, log="\n".join(handler_stream))


def test_accepts_every_volume_and_rejects_every_localizer(export, ingested):
    report = ingested["report"]
    volumes = [s for s in export.series if not s.is_localizer]
    assert report.n_accepted == len(volumes) == 5
    assert sorted(r.reasons for r in report.series if r.status == "rejected") == [["localizer"]] * 2
    assert {s.reason for s in report.skipped} == {"non_image", "empty_file"}
    assert "5 series accepted" in report.summary()


def test_images_and_labels_sit_where_the_generator_put_them(export, ingested):
    out = ingested["out"]
    entries = {e.series_key: e for e in read_manifest(out)}
    secret = (out / SECRET_FILE_NAME).read_text().strip()
    key = bytes.fromhex(secret)
    assert any(s.oblique for s in export.series)
    for s in export.series:
        if s.is_localizer:
            continue
        series_key = "series-" + hmac.new(key, s.series_uid.encode(), hashlib.sha256).hexdigest()[:12]
        case_id = "case-" + hmac.new(key, s.patient.patient_id.encode(), hashlib.sha256).hexdigest()[:12]
        e = entries[series_key]
        assert e.case_id == case_id and e.modality == s.modality
        img = nib.load(str(out / e.image))
        np.testing.assert_allclose(img.affine, s.affine_ras, atol=1e-3)
        assert tuple(img.shape) == tuple(s.shape) == tuple(e.shape)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)  # ITK reads the qform
        np.testing.assert_allclose(img.header.get_zooms(), e.spacing, rtol=1e-5)
        lab = nib.load(str(out / e.label))
        assert lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(lab.affine, img.affine)
        np.testing.assert_array_equal(np.asanyarray(lab.dataobj), np.asanyarray(nib.load(str(s.label_path)).dataobj))
        # integers as stored (CT in HU): the synthetic rescales are integral, so no float32 and no scl_slope
        assert img.get_data_dtype() in ((np.int16,) if s.modality == "CT" else (np.int16, np.int32))
        assert float(img.dataobj.slope) == 1.0 and float(img.dataobj.inter) == 0.0


def test_world_coordinates_agree_with_dcm2niix(export, ingested, tmp_path):
    niix = dcm2niix_convert(export.export_dir, tmp_path / "niix")
    assert niix, "dcm2niix wrote no NIfTI"
    out = ingested["out"]
    key = bytes.fromhex((out / SECRET_FILE_NAME).read_text().strip())
    entries = {e.series_key: e for e in read_manifest(out)}
    for s in export.series:
        if s.is_localizer:
            continue
        series_key = "series-" + hmac.new(key, s.series_uid.encode(), hashlib.sha256).hexdigest()[:12]
        assert_same_world(out / entries[series_key].image, niix[s.series_uid])


def _all_bytes(root: Path):
    for p in root.rglob("*"):
        if p.is_file() and p.name != SECRET_FILE_NAME:
            data = p.read_bytes()
            yield p, data + (gzip.decompress(data) if p.name.endswith(".gz") else b"")


def test_no_phi_or_source_uid_downstream(export, ingested, capsys):
    out = ingested["out"]
    needles = export.phi_strings() + export.uid_strings() + phi_strings()
    needles += [s.patient.patient_id for s in export.series]
    secret = (out / SECRET_FILE_NAME).read_text().strip()
    for p, data in _all_bytes(out):
        text = data.decode("latin-1").upper()
        for needle in needles:
            assert needle.upper() not in text, f"{needle!r} found in {p.relative_to(out)}"
            assert needle.upper() not in str(p.relative_to(out)).upper()
        assert secret.upper() not in text
    logged = (ingested["log"] + capsys.readouterr().err).upper()
    for needle in needles + [secret]:
        assert needle.upper() not in logged
    assert stat.S_IMODE((out / SECRET_FILE_NAME).stat().st_mode) == 0o600


def test_export_is_untouched(export, ingested):
    assert _tree(export.root) == ingested["before"]


def test_manifest_and_report_contract(export, ingested):
    out = ingested["out"]
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    for d in lines:
        assert {"case_id", "modality", "image", "label", "shape", "spacing", "series_key"} <= set(d)
        assert (out / d["image"]).is_file() and (out / d["label"]).is_file()
    rep = json.loads((out / "ingest_report.json").read_text())
    for s in rep["series"]:
        assert {"series_key", "status", "reasons", "warnings", "modality", "n_slices", "output"} <= set(s)
    assert {"path", "reason"} <= set(rep["skipped"][0])


def test_rerun_does_no_work(export, ingested, monkeypatch):
    out = ingested["out"]
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}

    def boom(*a, **k):
        raise AssertionError("re-run decoded pixel data")

    monkeypatch.setattr(ingest_mod, "read_stored_volume", boom)
    report = ingest(export.export_dir, out, labels_dir=export.labels_dir, progress=False, workers=2)
    assert {r.action for r in report.series if r.status == "accepted"} == {"unchanged"}
    assert {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    assert len(read_manifest(out)) == 5


def test_crash_mid_write_leaves_no_partial_file_and_resume_finishes(tmp_path, monkeypatch):
    exp = tmp_path / "export"
    for i in range(3):
        write_series(exp / f"S{i}", n=5, rows=16, cols=16, origin=(0, 0, 20.0 * i), patient_id=f"P{i}", seed=i)
    out = tmp_path / "data"
    real_write = ingest_mod.write_nifti
    calls = {"n": 0}

    class Crash(Exception):
        pass

    def crashing_write(path, data, affine, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            calls["crashed"] = Path(path)
            # Die inside the gzip stream, after part of the volume went to disk.
            real_gzip = nifti_mod._gzip_writer

            def dying_gzip(fileobj, level):
                gz = real_gzip(fileobj, level)
                written = {"n": 0}
                real_gz_write = gz.write

                def write(b):
                    written["n"] += len(b)
                    if written["n"] > 1000:
                        raise Crash()
                    return real_gz_write(b)

                gz.write = write
                return gz

            monkeypatch.setattr(nifti_mod, "_gzip_writer", dying_gzip)
            try:
                return real_write(path, data, affine, **kw)
            finally:
                monkeypatch.setattr(nifti_mod, "_gzip_writer", real_gzip)
        return real_write(path, data, affine, **kw)

    monkeypatch.setattr(ingest_mod, "write_nifti", crashing_write)
    with pytest.raises(Crash):
        ingest(exp, out, progress=False, workers=1)
    images = sorted((out / "images").iterdir())
    assert not calls["crashed"].exists()  # no half-written NIfTI under the final name
    assert not [p for p in images if not p.name.endswith(".nii.gz")]  # and no temp file left behind
    assert 1 <= len(images) <= 2 and len(list((out / ".ingest_state").iterdir())) == len(images)
    for p in images:
        nib.load(str(p)).get_fdata()  # every file under a final name is complete
    monkeypatch.setattr(ingest_mod, "write_nifti", real_write)
    report = ingest(exp, out, progress=False, workers=1)  # resumes: finished series are not redone
    actions = [r.action for r in report.series]
    assert actions.count("unchanged") == len(images) and actions.count("written") == 3 - len(images)
    assert len(read_manifest(out)) == 3


def _one_series_with_label(tmp_path, label_fn):
    files = write_series(tmp_path / "export" / "S", n=6, rows=12, cols=10)
    import pydicom

    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    first = ingest(tmp_path / "export", tmp_path / "ref", progress=False)
    (rec,) = first.series
    ref = nib.load(str(tmp_path / "ref" / rec.output))
    mask = (np.arange(np.prod(ref.shape)).reshape(ref.shape) % 5).astype(np.uint8)
    labels = tmp_path / "labels"
    labels.mkdir()
    data, affine = label_fn(mask, ref.affine)
    nib.save(nib.Nifti1Image(data, affine), labels / f"{uid}.nii.gz")
    report = ingest(tmp_path / "export", tmp_path / "data", labels_dir=labels, progress=False)
    return report, mask, ref


def test_label_with_flipped_and_permuted_axes_is_reordered(tmp_path):
    def flip_permute(mask, aff):
        from nibabel.orientations import apply_orientation, inv_ornt_aff

        ornt = np.array([[1, -1], [0, 1], [2, -1]])  # swap x/y, flip two axes
        return apply_orientation(mask, ornt), aff @ inv_ornt_aff(ornt, mask.shape)

    report, mask, ref = _one_series_with_label(tmp_path, flip_permute)
    (rec,) = report.series
    assert rec.status == "accepted" and rec.label
    lab = nib.load(str(tmp_path / "data" / rec.label))
    np.testing.assert_array_equal(np.asanyarray(lab.dataobj), mask)
    np.testing.assert_allclose(lab.affine, ref.affine)


def test_label_off_by_a_voxel_is_an_error_not_a_resample(tmp_path):
    def shifted(mask, aff):
        moved = aff.copy()
        moved[:3, 3] += aff[:3, 0]  # one voxel along x
        return mask, moved

    report, _, _ = _one_series_with_label(tmp_path, shifted)
    (rec,) = report.series
    assert rec.status == "rejected" and rec.reasons == ["label_mismatch"]
    assert "1.000 voxels" in rec.details["label_mismatch"] and rec.series_key in rec.details["label_mismatch"]
    assert not list((tmp_path / "data" / "labels").glob("*.nii.gz"))


def test_label_of_the_wrong_shape_is_an_error(tmp_path):
    report, _, _ = _one_series_with_label(tmp_path, lambda m, a: (m[:, :, :-1], a))
    (rec,) = report.series
    assert rec.reasons == ["label_mismatch"] and "does not match image grid" in rec.details["label_mismatch"]


def test_labels_from_csv(tmp_path):
    files = write_series(tmp_path / "export" / "S", n=5)
    import pydicom

    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    first = ingest(tmp_path / "export", tmp_path / "ref", progress=False)
    ref = nib.load(str(tmp_path / "ref" / first.series[0].output))
    (tmp_path / "lab").mkdir()
    nib.save(nib.Nifti1Image(np.ones(ref.shape, np.uint8), ref.affine), tmp_path / "lab" / "mask1.nii.gz")
    (tmp_path / "lab" / "labels.csv").write_text(f"series_uid,label_path\n{uid},mask1.nii.gz\n")
    report = ingest(tmp_path / "export", tmp_path / "data", labels_dir=tmp_path / "lab" / "labels.csv", progress=False)
    assert report.series[0].label is not None


def test_bad_locations_get_errors_that_say_what_to_do(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        ingest(tmp_path / "nope", tmp_path / "data", progress=False)
    (tmp_path / "exp").mkdir()
    with pytest.raises(IngestError, match="inside the export"):
        ingest(tmp_path / "exp", tmp_path / "exp" / "data", progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(IngestError, match="not writable"):
        ingest(tmp_path / "exp", tmp_path / "afile" / "data", progress=False)
    with pytest.raises(IngestError, match="label path"):
        ingest(tmp_path / "exp", tmp_path / "data", labels_dir=tmp_path / "nolabels", progress=False)


def test_series_rejected_on_rerun_loses_its_old_outputs(tmp_path):
    files = write_series(tmp_path / "export" / "S", n=6)
    out = tmp_path / "data"
    ingest(tmp_path / "export", out, progress=False)
    assert len(read_manifest(out)) == 1
    files[3].unlink()  # a slice disappears from the export
    report = ingest(tmp_path / "export", out, progress=False)
    assert report.series[0].reasons == ["missing_slices"]
    assert read_manifest(out) == [] and not list((out / "images").iterdir())


def test_uid_like_file_names_are_pseudonymized_in_the_report(tmp_path):
    uid_name = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    write_non_image(tmp_path / "export" / uid_name, "SR")
    report = ingest(tmp_path / "export", tmp_path / "data", progress=False)
    (skip,) = report.skipped
    assert skip.path.startswith("uid-") and uid_name not in (tmp_path / "data" / "ingest_report.json").read_text()


def test_pydicom_warnings_with_values_do_not_reach_the_log(tmp_path, caplog):
    import pydicom

    files = write_series(tmp_path / "export" / "S", n=3)
    ds = pydicom.dcmread(files[0])
    # Invalid DA and IS values; pydicom quotes such values in its warnings when they are read.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns here already, at write time in the test
        ds["PatientBirthDate"].value = "QUIXOTE-BIRTHDAY"
    ds.EchoNumbers = "86421357"  # ingest reads EchoNumbers; patched to letters below
    ds.save_as(files[0], enforce_file_format=True)
    files[0].write_bytes(files[0].read_bytes().replace(b"86421357", b"QUIXOTE7"))
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        report = ingest(tmp_path / "export", tmp_path / "data", progress=False)
    assert "QUIXOTE" not in caplog.text.upper()
    assert report.n_accepted == 1  # a malformed optional element does not cost the slice


def test_second_ingest_into_the_same_data_dir_is_refused_while_the_first_runs(tmp_path):
    import fcntl

    write_series(tmp_path / "export" / "S", n=4)
    out = tmp_path / "data"
    out.mkdir()
    with open(out / ".ingest.lock", "a+") as held:  # what a running ingest holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on otherhost\n")
        held.flush()
        with pytest.raises(IngestError, match=r"another ingest \(pid 4242 on otherhost\) is writing into .*wait for it"):
            ingest(tmp_path / "export", out, progress=False)
        assert not (out / "manifest.jsonl").exists() and not (out / "images").exists()
    report = ingest(tmp_path / "export", out, progress=False)  # released (as when that process ends)
    assert report.n_accepted == 1
