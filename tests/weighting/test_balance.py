"""On a toy problem whose two losses differ by 100x, GradNorm brings the gradient norms on W together."""

import statistics

import pytest


def _run(toy, weighting, steps=300):
    problem = toy(weighting)
    ratios, weights = [], []
    for _ in range(steps):
        res = problem.step()
        assert res.applied
        ratios.append(res.task_grad_norms["ct"] / res.task_grad_norms["mr"])
        weights.append(problem.weighting.weights.clone())
    return ratios, weights, res


def test_losses_differ_by_about_100x(toy):
    res = toy({"method": "equal"}).step()
    assert 30 < res.losses["ct"] / res.losses["mr"] < 300


def test_gradnorm_drives_gradient_norms_together_while_equal_does_not(toy):
    equal, _, _ = _run(toy, {"method": "equal"})
    published, _, _ = _run(toy, {"method": "gradnorm", "alpha": 1.5})
    pure, w_pure, _ = _run(toy, {"method": "gradnorm", "alpha": 0.0})
    # median over the last 50 steps: single-batch norms are noisy
    end = lambda r: statistics.median(r[-50:])  # noqa: E731
    assert end(equal) > 20  # the CT gradient dominates W throughout
    # alpha = 1.5 targets G_i proportional to r_i^alpha (MR trains faster here), so not exactly 1
    assert 1 / 4 < end(published) < 4 and end(equal) / end(published) > 10
    # alpha = 0 targets equal norms exactly
    assert end(pure) == pytest.approx(1.0, abs=0.25)
    assert float(w_pure[-1][0]) < 0.2 < 1.8 < float(w_pure[-1][1])  # the weight moved to the small-loss task


@pytest.mark.parametrize("weighting", [{"method": "gradnorm"}, {"method": "gradnorm", "alpha": 0.0, "lr": 0.1},
                                       {"method": "dwa", "steps_per_epoch": 10, "temperature": 0.5}])
def test_weights_stay_positive_and_sum_to_the_task_count(toy, weighting):
    _, weights, _ = _run(toy, weighting, steps=150)
    for w in weights:
        assert bool((w > 0).all())
        assert float(w.sum()) == pytest.approx(2.0, rel=1e-6)
    assert any(abs(float(w[0]) - 1.0) > 1e-3 for w in weights)  # they did move
