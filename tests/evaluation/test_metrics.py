"""Dice against hand computation."""

import numpy as np

from medmtl.evaluation.metrics import dice_per_class, mean_ignoring_nan


def test_dice_matches_hand_counts():
    ref = np.zeros((4, 4, 2), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[0:2, 0:2, 0] = 1  # 4 voxels of class 1
    pred[0:2, 0:1, 0] = 1  # 2 voxels, all inside
    pred[3, 3, 1] = 1  # 1 false positive
    ref[2, 2, :] = 2  # class 2 only in the reference
    pred[0, 3, :] = 3  # class 3 only in the prediction
    d = dice_per_class(pred, ref, 4)
    assert d[0] == 2 * 2 / (3 + 4)
    assert d[1] == 0.0 and d[2] == 0.0
    assert np.isnan(d[3])  # class 4 absent from both: undefined, excluded from means
    assert mean_ignoring_nan(d) == (4 / 7) / 3


def test_perfect_prediction_is_one():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, size=(8, 8, 8))
    assert np.all(dice_per_class(lab, lab, 2) == 1.0)
