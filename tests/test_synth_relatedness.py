"""`synth --relatedness` and `--mr-labelled`: the MR cohort's anatomy read back from the written masks."""

from __future__ import annotations

import filecmp

import nibabel as nib
import numpy as np
import pytest

from medmtl.errors import InputError
from medmtl.synth import synthesize_exports

LIVER, SPLEEN, KIDNEY_L, KIDNEY_R = 1, 2, 3, 4


def _centroid_lps(path, label):
    img = nib.load(str(path))
    ijk = np.argwhere(np.asarray(img.dataobj) == label)
    ras = nib.affines.apply_affine(img.affine, ijk).mean(axis=0)
    return np.array([-ras[0], -ras[1], ras[2]])  # RAS -> LPS: +x is the patient's left


def _volume(path, label):
    img = nib.load(str(path))
    return float((np.asarray(img.dataobj) == label).sum() * np.prod(img.header.get_zooms()[:3]))


def _mr(res):
    return [s for s in res.series if s.modality == "MR"]


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("related")
    kw = dict(n_ct=1, n_mr=3, seed=5, ct_matrix=48, mr_matrix=48)
    return {r: synthesize_exports(root / str(r), relatedness=r, **kw) for r in (1.0, 0.0)} | {
        "default": synthesize_exports(root / "default", **kw)}


def test_relatedness_one_is_the_ct_distribution_byte_for_byte(cohorts):
    for a, b in zip(_mr(cohorts[1.0]), _mr(cohorts["default"])):
        assert filecmp.cmp(a.label_path, b.label_path, shallow=False)


def test_relatedness_zero_mirrors_the_layout_and_changes_sizes(cohorts):
    for near, far in zip(_mr(cohorts[1.0]), _mr(cohorts[0.0])):
        # CT-like: liver on the patient's right (LPS x below the spleen's), kidney_left on the left
        assert _centroid_lps(near.label_path, LIVER)[0] < _centroid_lps(near.label_path, SPLEEN)[0]
        assert _centroid_lps(near.label_path, KIDNEY_L)[0] > _centroid_lps(near.label_path, KIDNEY_R)[0]
        # conflicting: both swapped, the liver smaller and the spleen larger than in the same patient drawn at R = 1
        assert _centroid_lps(far.label_path, LIVER)[0] > _centroid_lps(far.label_path, SPLEEN)[0]
        assert _centroid_lps(far.label_path, KIDNEY_L)[0] < _centroid_lps(far.label_path, KIDNEY_R)[0]
        assert _volume(far.label_path, LIVER) < 0.5 * _volume(near.label_path, LIVER)
        assert _volume(far.label_path, SPLEEN) > 1.5 * _volume(near.label_path, SPLEEN)


def test_mr_labelled_writes_masks_for_the_first_k_mr_patients(tmp_path):
    res = synthesize_exports(tmp_path / "s", n_ct=1, n_mr=3, seed=5, ct_matrix=32, mr_matrix=32, mr_labelled=1)
    assert [s.label_path is not None for s in _mr(res)] == [True, False, False]
    assert len(list(res.labels_dir.glob("*.nii.gz"))) == 2  # the CT series' mask and one MR mask
    with pytest.raises(InputError, match="relatedness"):
        synthesize_exports(tmp_path / "t", n_ct=1, n_mr=1, relatedness=1.5)
