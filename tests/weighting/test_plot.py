"""The weights-over-training plot is a real PNG, and an empty history says what is missing."""

import math

import pytest

from medmtl.weighting.plot import plot_weights


def test_plot_writes_a_png(tmp_path, toy):
    problem = toy({"method": "dst", "max_drop_probability": 0.9, "stall_patience": 2})
    history = []
    for _ in range(20):
        res = problem.step()
        history.append({**{f"loss/{t}": v for t, v in res.losses.items()}, **problem.weighting.log_values()})
    history[5].pop("weight/ct")  # a missing point leaves a gap, not an error
    path = plot_weights(history, tmp_path / "plots" / "weights.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plot_without_weights_names_the_prefix(tmp_path):
    with pytest.raises(ValueError, match="'weight/'"):
        plot_weights([{"loss/ct": 1.0}, {"loss/ct": math.nan}], tmp_path / "w.png")
