"""MetaBalance, PCGrad and CAGrad against NumPy replays of their papers' algorithms on small random gradients.

Each replay works on the gradient vectors themselves (float64), not on the Gram-matrix algebra the methods use,
so an error in that algebra shows. The tracked values (norms, cosine, conflict fraction) are replayed too.
"""

import math

import numpy as np
import pytest
import torch

from medmtl.config import validate_config
from medmtl.weighting import METHODS, build_weighting

TASKS = ("ct", "mr")
SHAPES = [(3, 4), (5,), (2, 2, 2)]


def _method(tasks=TASKS, **weighting):
    return build_weighting(validate_config({"sharing": [{"kind": "hard"}], "weighting": weighting}).weighting, tasks)


def _grads(rng, n_tasks=2, scales=None):
    """Per task: one float32 tensor per parameter shape (random normal, task k scaled by ``scales[k]``)."""
    scales = scales or [1.0] * n_tasks
    return [[torch.tensor(rng.normal(size=s) * scales[k], dtype=torch.float32) for s in SHAPES] for k in range(n_tasks)]


def _flat(gs):
    return np.concatenate([g.numpy().astype(np.float64).ravel() for g in gs])


def _step(method, grads, tasks=TASKS, applied=True):
    out = method.adjust_gradients({t: [g.clone() for g in gs] for t, gs in zip(tasks, grads)})
    method.after_step({t: 1.0 for t in tasks}, None, applied=applied)
    return None if out is None else _flat(out)


def _with_dot(rng, sign):
    """Two tasks' gradients whose dot product has the given sign."""
    while True:
        g = _grads(rng)
        if np.sign(_flat(g[0]) @ _flat(g[1])) == sign:
            return g


def test_every_gradient_level_method_is_replayed_here():
    shared = {m for m, cls in METHODS.items()
              if validate_config({"sharing": [{"kind": "hard"}], "weighting": {"method": m}}).weighting.gradient_parameters}
    assert shared == {"metabalance", "pcgrad", "cagrad"}


# ------------------------------------------------------------------------------------------ PCGrad
def _replay_pcgrad(vectors, orders):
    """Yu et al. 2020, Algorithm 1, on the vectors themselves."""
    pc = []
    for i, g in enumerate(vectors):
        gi = g.copy()
        for j in orders[i]:
            dot = gi @ vectors[j]
            if dot < 0:
                gi = gi - dot / (vectors[j] @ vectors[j]) * vectors[j]
        pc.append(gi)
    return sum(pc), pc


def test_pcgrad_without_conflict_is_the_plain_sum():
    rng = np.random.default_rng(0)
    g = _with_dot(rng, +1)
    out = _step(_method(method="pcgrad"), g)
    np.testing.assert_allclose(out, _flat(g[0]) + _flat(g[1]), rtol=1e-6, atol=1e-7)


def test_pcgrad_with_conflict_projects_both_gradients_off_each_other():
    rng = np.random.default_rng(1)
    pcgrad = _method(method="pcgrad")
    for _ in range(5):
        g = _with_dot(rng, -1)
        v = [_flat(x) for x in g]
        expected, pc = _replay_pcgrad(v, [[1], [0]])
        np.testing.assert_allclose(_step(pcgrad, g), expected, rtol=1e-5, atol=1e-6)
        # each projected gradient is orthogonal to the other task's original gradient
        assert abs(pc[0] @ v[1]) < 1e-9 * np.linalg.norm(pc[0]) * np.linalg.norm(v[1]) + 1e-12
    assert pcgrad.log_values()["gradients/conflict_fraction"] == 1.0


def test_pcgrad_draws_a_random_order_per_step_as_published():
    # three tasks: the order matters; the replay draws it from the documented generator
    tasks = ("a", "b", "c")
    pcgrad = _method(tasks, method="pcgrad", seed=4)
    rng = np.random.default_rng(2)
    differs = 0
    for step in range(12):
        g = _grads(rng, 3)
        v = [_flat(x) for x in g]
        draw = np.random.default_rng([4, step])
        orders = [[int(j) for j in draw.permutation(3) if j != i] for i in range(3)]
        expected, _ = _replay_pcgrad(v, orders)
        np.testing.assert_allclose(_step(pcgrad, g, tasks), expected, rtol=1e-5, atol=1e-6)
        fixed, _ = _replay_pcgrad(v, [[j for j in range(3) if j != i] for i in range(3)])
        differs += not np.allclose(fixed, expected, rtol=1e-6, atol=1e-8)
    assert differs > 0  # some step's drawn order changed the result
    assert int(pcgrad.draws) == 12


# ------------------------------------------------------------------------------------------ CAGrad
def _replay_cagrad(v, c):
    """Liu et al. 2021: dual minimized by a dense grid over the simplex (two tasks), then d = g0 + sqrt(phi) g_w/||g_w||."""
    g0 = (v[0] + v[1]) / 2
    s = c * np.linalg.norm(g0)
    x = np.linspace(0.0, 1.0, 200_001)[:, None]
    gw = x * v[0] + (1 - x) * v[1]
    F = gw @ g0 + s * np.linalg.norm(gw, axis=1)
    best = int(np.argmin(F))
    gw = gw[best]
    d = g0 + (s / np.linalg.norm(gw) * gw if np.linalg.norm(gw) > 0 else 0.0)
    return d, float(x[best, 0])


@pytest.mark.parametrize("sign", [-1, +1], ids=["conflicting", "aligned"])
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_cagrad_matches_the_dual_solved_numerically(sign, c):
    rng = np.random.default_rng(3)
    cagrad = _method(method="cagrad", c=c)
    for _ in range(4):
        g = _with_dot(rng, sign)
        v = [_flat(x) for x in g]
        d, x = _replay_cagrad(v, c)
        out = _step(cagrad, g)
        # sum scale: twice CAGrad's d (d is an update around the *average* gradient)
        np.testing.assert_allclose(out, 2 * d, rtol=2e-4, atol=2e-5 * np.linalg.norm(d))
        assert cagrad.log_values()["cagrad/dual_weight/ct"] == pytest.approx(x, abs=1e-3)
        # primal: d lies in the ball and no point of the ball improves the worst task more
        g0 = (v[0] + v[1]) / 2
        assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-6)
        ball = rng.normal(size=(4000, len(g0)))
        ball = g0 + c * np.linalg.norm(g0) * ball / np.linalg.norm(ball, axis=1, keepdims=True)
        worst = np.minimum(ball @ v[0], ball @ v[1]).max()
        assert min(d @ v[0], d @ v[1]) >= worst - 1e-6 * abs(worst)


def test_cagrad_with_c_zero_is_equal_weighting():
    rng = np.random.default_rng(4)
    cagrad = _method(method="cagrad", c=0.0)
    for sign in (-1, +1, -1):
        g = _with_dot(rng, sign)
        np.testing.assert_allclose(_step(cagrad, g), _flat(g[0]) + _flat(g[1]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("rescale", "divisor"), [("one_plus_c_squared", 1.25), ("one_plus_c", 1.5)])
def test_cagrad_rescaling_options_of_the_authors_code(rescale, divisor):
    rng = np.random.default_rng(5)
    g = _with_dot(rng, -1)
    plain = _step(_method(method="cagrad", c=0.5), g)
    np.testing.assert_allclose(_step(_method(method="cagrad", c=0.5, rescale=rescale), g), plain / divisor, rtol=1e-6)


def test_cagrad_edge_cases_stay_finite():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([0.5])]
    for other in ([g.clone() for g in a], [-2 * g for g in a], [torch.zeros(2), torch.zeros(1)]):
        out = _step(_method(method="cagrad", c=0.5), [a, other])
        assert np.isfinite(out).all()
    # identical gradients: the ball's best point is g0 (1 + c) in the gradient's direction
    np.testing.assert_allclose(_step(_method(method="cagrad", c=0.5), [a, [g.clone() for g in a]]), 2 * 1.5 * _flat(a), rtol=1e-6)


# ------------------------------------------------------------------------------------- MetaBalance
def _replay_metabalance(steps, main, r, beta):
    """He et al. 2022, Algorithm 1, per parameter tensor (the authors' optimizer), m = 0 at the start."""
    m = np.zeros((2, len(SHAPES)))
    outs = []
    for grads in steps:
        arrays = [[g.numpy().astype(np.float64) for g in gs] for gs in grads]
        for k in range(2):
            m[k] = beta * m[k] + (1 - beta) * np.array([np.linalg.norm(a) for a in arrays[k]])
        aux = 1 - main
        out = [arrays[main][p] + (r * m[main, p] / m[aux, p] + 1 - r) * arrays[aux][p] for p in range(len(SHAPES))]
        outs.append(np.concatenate([o.ravel() for o in out]))
    return outs, m


@pytest.mark.parametrize("main_task", TASKS)
def test_metabalance_matches_the_algorithm_per_parameter(main_task):
    rng = np.random.default_rng(6)
    steps = [_grads(rng, scales=[10.0 * 0.8**k, 0.1]) for k in range(8)]
    mb = _method(method="metabalance", main_task=main_task, relax_factor=0.6, beta=0.8)
    expected, m = _replay_metabalance(steps, TASKS.index(main_task), 0.6, 0.8)
    for k, (g, e) in enumerate(zip(steps, expected)):
        np.testing.assert_allclose(_step(mb, g), e, rtol=1e-5, atol=1e-7, err_msg=f"step {k}")
    np.testing.assert_allclose(mb.moving_norm.numpy(), m, rtol=1e-6)


def test_metabalance_relax_one_gives_the_aux_gradient_the_main_magnitude_and_zero_is_the_sum():
    rng = np.random.default_rng(7)
    g = _grads(rng, scales=[5.0, 0.01])
    full = _method(method="metabalance", main_task="ct", relax_factor=1.0)
    out = full.adjust_gradients({t: gs for t, gs in zip(TASKS, g)})
    for p, (o, main, aux) in enumerate(zip(out, g[0], g[1])):
        # one step from m = 0: the ratio of moving averages is the ratio of this step's norms
        torch.testing.assert_close(torch.linalg.vector_norm(o - main), torch.linalg.vector_norm(main), rtol=1e-5, atol=0)
    none = _method(method="metabalance", relax_factor=0.0)
    np.testing.assert_allclose(_step(none, g), _flat(g[0]) + _flat(g[1]), rtol=1e-6)


# ------------------------------------------------------------------------- shared bookkeeping, all three
GRADIENT_METHODS = [{"method": "metabalance"}, {"method": "pcgrad"}, {"method": "cagrad"}]


@pytest.mark.parametrize("weighting", GRADIENT_METHODS, ids=lambda w: w["method"])
def test_tracked_norms_cosine_and_conflict_fraction(weighting):
    rng = np.random.default_rng(8)
    method = _method(**weighting)
    conflicts = 0
    for k, sign in enumerate([-1, +1, +1, -1, +1]):
        g = _with_dot(rng, sign)
        applied = k != 2  # a skipped step is not counted
        _step(method, g, applied=applied)
        conflicts += applied and sign < 0
        if applied:
            v = [_flat(x) for x in g]
            logged = method.log_values()
            assert logged["gradients/norm/ct"] == pytest.approx(np.linalg.norm(v[0]), rel=1e-5)
            assert logged["gradients/norm/mr"] == pytest.approx(np.linalg.norm(v[1]), rel=1e-5)
            cos = v[0] @ v[1] / np.linalg.norm(v[0]) / np.linalg.norm(v[1])
            assert logged["gradients/cosine/ct_mr"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
            assert logged["weight/ct"] == logged["weight/mr"] == 1.0  # the losses keep weight 1
    assert method.log_values()["gradients/conflict_fraction"] == pytest.approx(conflicts / 4)
    assert int(method.observed_steps) == 4


@pytest.mark.parametrize("weighting", GRADIENT_METHODS, ids=lambda w: w["method"])
def test_non_finite_gradients_keep_the_sum_and_change_nothing(weighting):
    rng = np.random.default_rng(9)
    method = _method(**weighting)
    _step(method, _grads(rng))
    before = {k: v.clone() for k, v in method.state_dict().items() if k != "draws"}
    bad = _grads(rng)
    bad[1][0][0, 0] = math.inf
    assert method.adjust_gradients({t: gs for t, gs in zip(TASKS, bad)}) is None
    method.after_step({"ct": 1.0, "mr": 1.0}, None, applied=False)
    for k, v in before.items():
        torch.testing.assert_close(method.state_dict()[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("weighting", GRADIENT_METHODS, ids=lambda w: w["method"])
def test_under_a_loss_scale_the_method_sees_unscaled_gradients(toy, weighting):
    # fp16's GradScaler multiplies every backward by its scale; a CPU scaler does the same here
    plain, scaled = toy(weighting), toy(weighting)
    scaled.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=10_000)
    assert scaled.precision.loss_scale == 2.0**14
    for _ in range(4):
        batch = plain.batch()
        scaled.batch()  # keep the two data streams in step
        a, b = plain.step(batch), scaled.step(batch)
        assert a.applied and b.applied
        logged_a, logged_b = plain.weighting.log_values(), scaled.weighting.log_values()
        for key in ("gradients/norm/ct", "gradients/norm/mr", "gradients/coefficient/mr"):
            assert logged_b[key] == pytest.approx(logged_a[key], rel=1e-5), key
    for pa, pb in zip(plain.net.parameters(), scaled.net.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
    for k, v in plain.weighting.state_dict().items():
        torch.testing.assert_close(scaled.weighting.state_dict()[k], v, rtol=1e-5, atol=0, msg=k)
