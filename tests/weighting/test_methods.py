"""Uncertainty, DWA and DST each match their formula written out by hand; skipped steps change nothing."""

import math

import numpy as np
import pytest
import torch

from medmtl.config import validate_config
from medmtl.models.two_column import TwoColumnNet
from medmtl.training.trainer import build_optimizer
from medmtl.weighting import METHODS, build_weighting

TASKS = ("ct", "mr")


def _cfg(**weighting):
    return validate_config({"weighting": weighting}).weighting


def test_every_config_method_is_registered():
    # the discriminated union and the registry must name the same methods
    from typing import get_args

    from medmtl.config import WeightingConfig

    union = get_args(get_args(WeightingConfig)[0])
    assert {c.model_fields["method"].default for c in union} == set(METHODS)


# ------------------------------------------------------------------------------------- uncertainty
def test_uncertainty_term_gradient_and_update_match_kendall(toy):
    problem = toy({"method": "uncertainty"}, lr=0.1)
    u = problem.weighting
    with torch.no_grad():
        u.log_variance.copy_(torch.tensor([0.5, -0.3]))
    s = np.array([0.5, -0.3])
    L = {"ct": torch.tensor(40.0, requires_grad=True), "mr": torch.tensor(0.4, requires_grad=True)}
    terms = u.task_terms(L)
    for i, t in enumerate(TASKS):
        assert float(terms[t].detach()) == pytest.approx(math.exp(-s[i]) * float(L[t].detach()) + s[i], rel=1e-6)
    # one real step: the SGD group of the s_i moves them by -lr * (1 - exp(-s) L)
    res = problem.step()
    losses = np.array([res.losses[t] for t in TASKS])
    expected = s - 0.1 * (1.0 - np.exp(-s) * losses)
    np.testing.assert_allclose(u.log_variance.detach().numpy(), expected, rtol=1e-5)
    logged = u.log_values()
    for i, t in enumerate(TASKS):
        assert logged[f"weight/{t}"] == pytest.approx(math.exp(-expected[i]), rel=1e-5)
        assert logged[f"uncertainty/log_variance/{t}"] == pytest.approx(expected[i], rel=1e-5)


def test_uncertainty_converges_to_inverse_loss_weights():
    u = build_weighting(_cfg(method="uncertainty"), TASKS)
    opt = torch.optim.SGD(u.param_groups(), lr=0.05)
    fixed = {"ct": torch.tensor(50.0), "mr": torch.tensor(0.5)}
    for _ in range(3000):
        opt.zero_grad()
        sum(u.task_terms(fixed).values()).backward()
        opt.step()
    # stationary point of exp(-s) L + s: exp(-s*) = 1 / L
    np.testing.assert_allclose(torch.exp(-u.log_variance.detach()).numpy(), [1 / 50.0, 1 / 0.5], rtol=1e-3)


def test_uncertainty_log_variances_get_no_weight_decay_and_their_own_lr():
    cfg = validate_config({"model": {"channels": [4, 8, 16], "num_res_units": 0},
                           "weighting": {"method": "uncertainty", "lr": 0.01}})
    u = build_weighting(cfg.weighting, TASKS)
    opt = build_optimizer(cfg, TwoColumnNet(cfg=cfg), u.param_groups())
    (group,) = [g for g in opt.param_groups if g.get("name") == "weighting/uncertainty"]
    assert group["params"] == [u.log_variance] and group["weight_decay"] == 0.0 and group["lr"] == 0.01


# --------------------------------------------------------------------------------------------- DWA
def _hand_dwa(step_losses, steps_per_epoch, temp):
    """Weights after each step, from Liu et al. 2019 eq. (4) on epoch means, written independently."""
    T = len(step_losses[0])
    means, w, out = [], np.ones(T), []
    for k in range(len(step_losses)):
        if (k + 1) % steps_per_epoch == 0:
            means.append(np.mean(step_losses[k + 1 - steps_per_epoch: k + 1], axis=0))
            if len(means) >= 2:
                r = means[-1] / means[-2]
                w = T * np.exp(r / temp) / np.exp(r / temp).sum()
        out.append(w.copy())
    return out


def test_dwa_matches_formula_on_epoch_means():
    rng = np.random.default_rng(3)
    step_losses = [(2.0 * 0.9 ** k + rng.random() * 0.1, 0.02 * 0.97 ** k + rng.random() * 1e-3) for k in range(15)]
    dwa = build_weighting(_cfg(method="dwa", steps_per_epoch=3, temperature=2.0), TASKS)
    expected = _hand_dwa(step_losses, 3, 2.0)
    for k, (L, w) in enumerate(zip(step_losses, expected)):
        dwa.after_step(dict(zip(TASKS, L)), None, applied=True)
        np.testing.assert_allclose(dwa.weights.numpy(), w, rtol=1e-6, err_msg=f"step {k}")
    assert k >= 5 and expected[5][1] > 1.0  # MR's loss falls more slowly, so it gets more weight
    np.testing.assert_array_equal(expected[4], [1.0, 1.0])  # equal during the first two epochs
    assert dwa.log_values()["dwa/epochs"] == 5.0


def test_dwa_skipped_steps_neither_count_nor_contribute():
    a = build_weighting(_cfg(method="dwa", steps_per_epoch=2), TASKS)
    b = build_weighting(_cfg(method="dwa", steps_per_epoch=2), TASKS)
    seq = [(1.0, 1.0), (0.8, 0.9), (0.5, 0.85), (0.4, 0.8), (0.3, 0.78), (0.2, 0.76)]
    for k, L in enumerate(seq):
        a.after_step(dict(zip(TASKS, L)), None, applied=True)
        before = b.weights.clone()
        b.after_step({"ct": 1e9, "mr": 1e-9}, None, applied=False)
        torch.testing.assert_close(b.weights, before, rtol=0, atol=0)
        b.after_step(dict(zip(TASKS, L)), None, applied=True)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
    assert float(a.weights[1]) > 1.0


# --------------------------------------------------------------------------------------------- DST
DST = dict(method="dst", max_drop_probability=0.8, progress_share=0.25, ema=0.5, stall_patience=4, stall_tolerance=0.1, seed=7)


def test_dst_probabilities_match_the_formula():
    dst = build_weighting(_cfg(**DST), TASKS)
    seq = [(4.0, 1.0), (2.0, 1.0), (1.0, 0.99), (1.0, 1.0), (1.0, 1.02), (0.99, 1.0), (1.0, 0.5), (1.0, 1.0), (1.0, 1.0)]
    # by hand: EMA, best, stall counter and p for both tasks
    ema = best = L0 = None
    stall = np.zeros(2)
    for L in seq:
        L = np.array(L)
        dst.after_step(dict(zip(TASKS, L)), None, applied=True)
        if ema is None:
            ema, best, L0 = L.copy(), L.copy(), L.copy()
        else:
            ema = 0.5 * ema + 0.5 * L
            improved = ema < best * (1 - 0.1)
            best = np.where(improved, ema, best)
            stall = np.where(improved, 0, stall + 1)
        progress = np.clip(1 - ema / L0, 0, 1)
        p = 0.8 * (0.25 * progress + 0.75 * np.minimum(stall / 4, 1))
        np.testing.assert_allclose(dst.drop_probabilities().numpy(), p, rtol=1e-12)
    # CT improved until its EMA flattened; MR stalled, was reset by the 0.5 and stalls again
    assert stall.tolist() == [3.0, 2.0] and dst.stall.tolist() == [3, 2]
    logged = dst.log_values()
    assert logged["dst/drop_probability/ct"] == pytest.approx(p[0]) and logged["dst/stall/mr"] == 2.0


def _stalled(dst, p_ct_progress=1.0):
    """Put CT at full progress and fully stalled, MR fresh: p_ct = max_drop_probability, p_mr = 0."""
    with torch.no_grad():
        dst.seen.fill_(True)
        dst.initial_loss.copy_(torch.tensor([1.0, 1.0], dtype=torch.float64))
        dst.smoothed_loss.copy_(torch.tensor([1.0 - p_ct_progress, 1.0], dtype=torch.float64))
        dst.best_loss.copy_(dst.smoothed_loss)
        dst.stall.copy_(torch.tensor([100, 0]))


def test_dst_draws_follow_the_probabilities_and_never_drop_every_task():
    dst = build_weighting(_cfg(**DST), TASKS)
    _stalled(dst)
    p = dst.drop_probabilities().numpy()
    assert p.tolist() == pytest.approx([0.8, 0.0])
    picks = [dst.select_tasks(TASKS) for _ in range(4000)]
    dropped_ct = sum("ct" not in k for k in picks) / len(picks)
    assert dropped_ct == pytest.approx(0.8, abs=3 * math.sqrt(0.8 * 0.2 / 4000))
    assert all("mr" in k for k in picks)
    # both fully stalled: each would be dropped with 0.8, yet one task is always kept
    with torch.no_grad():
        dst.smoothed_loss.zero_()
        dst.stall.fill_(100)
    picks = [dst.select_tasks(TASKS) for _ in range(2000)]
    assert all(len(k) >= 1 for k in picks)
    assert sum(len(k) == 1 for k in picks) / len(picks) == pytest.approx(1 - 0.2 * 0.2, abs=0.04)
    assert dst.select_tasks(("mr",)) == ("mr",)  # only what is available, and never nothing


def test_dst_is_reproducible_from_its_seed():
    def draws(seed):
        dst = build_weighting(_cfg(**{**DST, "seed": seed}), TASKS)
        _stalled(dst, p_ct_progress=0.5)
        return [dst.select_tasks(TASKS) for _ in range(200)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_dst_dropped_task_is_not_forwarded_and_gets_weight_zero(toy):
    problem = toy(DST)
    _stalled(problem.weighting)
    kept = {"ct": 0, "mr": 0}
    for _ in range(30):
        res = problem.step()
        assert res.losses  # never both dropped
        for i, t in enumerate(("ct", "mr")):
            forwarded = t in res.losses
            kept[t] += forwarded
            assert float(problem.weighting.weights[i]) == float(forwarded)
            assert (t in res.task_grad_norms) == forwarded
    # the net saw exactly the kept tasks' batches, and the stalled CT task was dropped often
    assert problem.net.forwards == kept
    assert kept["ct"] < 20 and kept["mr"] > kept["ct"]


# ------------------------------------------------------------------------------------ skipped steps
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_skipped_step_leaves_the_weights_untouched(toy, method):
    problem = toy({"method": method})
    for _ in range(3):
        problem.step()
    before = {k: v.clone() for k, v in problem.weighting.state_dict().items() if isinstance(v, torch.Tensor) and k != "draws"}
    bad = problem.batch()
    bad["mr"]["image"][0, 0] = float("nan")
    res = problem.step(bad)
    assert not res.applied
    after = problem.weighting.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)


# --------------------------------------------------------------------------- shared-parameter methods
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_method_on_shared_parameters_is_refused_before_training_when_there_are_none(method):
    from medmtl.config import ConfigError

    hard = validate_config({"sharing": [{"kind": "hard", "depths": ["enc0"]}], "weighting": {"method": method}})
    soft = {"sharing": [{"kind": "soft", "depths": {"enc0": 1.0}}], "weighting": {"method": method}}
    if hard.weighting.gradient_parameters != "shared":
        validate_config(soft)  # nothing to refuse
        return
    # independent columns coupled by a penalty only: no parameter gets gradient from both tasks
    with pytest.raises(ConfigError, match=rf"weighting\.method: {method} acts on the parameters both tasks put gradient "
                                          r"on.*\(soft\) has none.*add a mechanism that shares parameters"):
        validate_config(soft, "configs/x.yaml")
