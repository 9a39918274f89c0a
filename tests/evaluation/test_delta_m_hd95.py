"""delta_m and HD95 against hand computation."""

import numpy as np
import pytest

from medmtl.evaluation.delta_m import average_runs, delta_m
from medmtl.evaluation.metrics import hd95_per_class


def test_delta_m_matches_hand_computation_and_flags_negative_transfer():
    stl = {"ct": {"dice": 0.80, "hd95": 10.0}, "mr": {"dice": 0.60, "hd95": 20.0}}
    mtl = {"ct": {"dice": 0.84, "hd95": 8.0}, "mr": {"dice": 0.57, "hd95": 22.0}}
    d = delta_m(mtl, stl)
    ct = ((0.84 - 0.80) / 0.80 * 100 + -1 * (8.0 - 10.0) / 10.0 * 100) / 2  # (+5 + +20) / 2 = 12.5
    mr = ((0.57 - 0.60) / 0.60 * 100 + -1 * (22.0 - 20.0) / 20.0 * 100) / 2  # (-5 + -10) / 2 = -7.5
    assert d.per_task["ct"] == pytest.approx(12.5) and ct == pytest.approx(12.5)
    assert d.per_task["mr"] == pytest.approx(mr) == -7.5
    assert d.value == pytest.approx((12.5 - 7.5) / 2)
    assert d.negative_transfer == ["mr"]


def test_runs_are_averaged_metric_by_metric_before_the_comparison():
    a = {"ct": {"dice": 0.7}, "mr": {"dice": 0.5}}
    b = {"ct": {"dice": 0.9}, "mr": {"dice": 0.7}}
    assert average_runs([a, b]) == {"ct": {"dice": pytest.approx(0.8)}, "mr": {"dice": pytest.approx(0.6)}}
    with pytest.raises(KeyError, match="mr"):
        delta_m({"ct": {"dice": 1.0}}, {"ct": {"dice": 1.0}, "mr": {"dice": 1.0}})


def test_hd95_of_shifted_block_equals_shift_in_mm():
    ref = np.zeros((20, 20, 10), dtype=np.uint8)
    ref[5:10, 5:10, 3:6] = 1
    pred = np.roll(ref, 2, axis=0)  # shifted by 2 voxels along x
    h = hd95_per_class(pred, ref, 2, spacing=(1.5, 1.0, 3.0))
    assert h[0] == pytest.approx(2 * 1.5)
    assert np.isnan(h[1])  # class 2 in neither map
    missed = hd95_per_class(np.zeros_like(ref), ref, 1, spacing=(1.0, 1.0, 1.0))
    assert missed[0] == pytest.approx(np.linalg.norm([20, 20, 10]))
