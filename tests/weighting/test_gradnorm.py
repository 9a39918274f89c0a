"""GradNorm: measured norms equal autograd's, one update equals the published formula by hand."""

import math

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from medmtl.config import validate_config
from medmtl.models.two_column import TwoColumnNet
from medmtl.training.precision import Precision
from medmtl.training.step import GradientProbe, train_step
from medmtl.weighting import build_weighting
from medmtl.weighting.gradnorm import GradNorm

CFG = {"model": {"channels": [4, 8, 16], "num_res_units": 0}}


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in ("ct", "mr"):
        out[m] = {"image": torch.randn(1, 1, 16, 16, 8, generator=g), "label": torch.randint(0, 5, (1, 1, 16, 16, 8), generator=g)}
    return out


@pytest.mark.parametrize("sharing", [[{"kind": "soft", "depths": {"bottleneck": 0.1}}], [{"kind": "cross_stitch", "depths": ["enc1"]}]])
def test_task_norms_read_between_backwards_equal_autograd(sharing):
    torch.manual_seed(0)
    cfg = validate_config({**CFG, "sharing": sharing, "weighting": {"method": "gradnorm", "depth": "bottleneck"}})
    net = TwoColumnNet(cfg=cfg)
    weighting = build_weighting(cfg.weighting, ("ct", "mr"))
    with torch.no_grad():
        weighting.w.copy_(torch.tensor([1.4, 0.6]))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    batch = _batch(1)
    W = net.depth_parameters("bottleneck")
    expected = {}
    for i, m in enumerate(("ct", "mr")):
        loss = loss_fn(net(batch[m]["image"], m), batch[m]["label"])
        grads = torch.autograd.grad(weighting.w[i].detach() * loss, W, allow_unused=True)
        expected[m] = float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    res = train_step(net=net, batch=batch, loss_fn=loss_fn, weighting=weighting, optimizer=opt,
                     precision=Precision("fp32", torch.device("cpu")), grad_clip=None, probe=GradientProbe(W), device=torch.device("cpu"))
    for m in ("ct", "mr"):
        assert res.task_grad_norms[m] == pytest.approx(expected[m], rel=1e-5)
    assert weighting.last["G/ct"] == pytest.approx(expected["ct"], rel=1e-5)


def _hand_gradnorm(losses, norms, *, alpha, lr):
    """The published update written out independently in NumPy, with Adam replayed by hand.

    ``norms`` are the measured G_i = ||grad_W (w_i L_i)||; g_i = G_i / w_i is what w_i multiplies.
    """
    T = len(losses[0])
    w = np.ones(T)
    m = np.zeros(T)
    v = np.zeros(T)
    b1, b2, eps = 0.9, 0.999, 1e-8
    L0 = np.asarray(losses[0], dtype=float)
    for t, (L, G) in enumerate(zip(losses, norms), start=1):
        L, G = np.asarray(L, float), np.asarray(G, float)
        ratio = L / L0
        r = ratio / ratio.mean()
        g = G / w
        target = (w * g).mean() * r ** alpha  # held constant
        grad = np.sign(w * g - target) * g  # d/dw_i of sum_j |w_j g_j - target_j|
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad ** 2
        w = w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        w = np.maximum(w, 1e-6)
        w = T * w / w.sum()
        l_grad = np.abs(G - target).sum()
    return w, l_grad


def test_updates_equal_hand_computation():
    cfg = validate_config({"weighting": {"method": "gradnorm", "alpha": 1.5, "lr": 0.01}}).weighting
    gn = GradNorm(cfg=cfg, tasks=("ct", "mr"))
    losses = [(2.0, 0.5), (1.0, 0.45), (0.8, 0.44)]
    norms = [(3.0, 1.0), (2.0, 1.5), (1.2, 1.9)]
    for L, G in zip(losses, norms):
        gn.after_step({"ct": L[0], "mr": L[1]}, {"ct": G[0], "mr": G[1]}, applied=True)
    w, l_grad = _hand_gradnorm(losses, norms, alpha=1.5, lr=0.01)
    np.testing.assert_allclose(gn.w.detach().numpy(), w, rtol=1e-5)
    np.testing.assert_allclose(gn.weights.numpy(), w, rtol=1e-5)
    assert gn.w.sum().item() == pytest.approx(2.0) and bool((gn.w > 0).all())
    assert gn.last["L_grad"] == pytest.approx(l_grad, rel=1e-5)
    # the CT task trains faster (its loss ratio falls more), so GradNorm shifts weight to MR
    assert gn.w[1] > gn.w[0]


def test_skipped_step_leaves_weights_untouched_and_state_round_trips():
    cfg = validate_config({"weighting": {"method": "gradnorm"}}).weighting
    gn = GradNorm(cfg=cfg, tasks=("ct", "mr"))
    gn.after_step({"ct": 1.0, "mr": 1.0}, {"ct": 5.0, "mr": 1.0}, applied=True)
    before = gn.w.detach().clone()
    gn.after_step({"ct": 0.5, "mr": 1.0}, {"ct": 5.0, "mr": 1.0}, applied=False)
    torch.testing.assert_close(gn.w.detach(), before)
    clone = GradNorm(cfg=cfg, tasks=("ct", "mr"))
    clone.load_state_dict(gn.state_dict())
    for a, b in ((gn, clone),):
        a.after_step({"ct": 0.7, "mr": 0.9}, {"ct": 4.0, "mr": 2.0}, applied=True)
        b.after_step({"ct": 0.7, "mr": 0.9}, {"ct": 4.0, "mr": 2.0}, applied=True)
    torch.testing.assert_close(gn.w.detach(), clone.w.detach(), rtol=0, atol=0)


def _scaled_step(scale, batch, loss_factor=1.0):
    """One GradNorm step of the tiny net with a real (CPU) GradScaler at ``scale``; ``None`` = no scaler.

    fp16 autocast needs CUDA, so this exercises the fp16 *control path* in fp32 arithmetic: scaled
    backward passes, the probe dividing by the loss scale, unscale_, the scaler's inf check and skip.
    """
    torch.manual_seed(0)
    cfg = validate_config({**CFG, "sharing": [{"kind": "soft", "depths": {"bottleneck": 0.1}}],
                           "weighting": {"method": "gradnorm", "depth": "bottleneck"}})
    net = TwoColumnNet(cfg=cfg)
    weighting = build_weighting(cfg.weighting, ("ct", "mr"))
    precision = Precision("fp32", torch.device("cpu"))
    if scale is not None:
        precision.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    loss_fn = lambda logits, y: loss_factor * dice_ce(logits, y)  # noqa: E731
    res = train_step(net=net, batch=batch, loss_fn=loss_fn, weighting=weighting, optimizer=opt, precision=precision,
                     grad_clip=None, probe=GradientProbe(net.depth_parameters("bottleneck")), device=torch.device("cpu"))
    return res, net, weighting, precision


@pytest.mark.parametrize("scale", [2.0 ** 14, 2.0 ** 120])
def test_loss_scaled_step_reads_unscaled_norms_and_updates_as_unscaled(scale):
    # 2^120: the scaled gradients are still finite, but the sum of their squares is not
    batch = _batch(2)
    plain, net0, w0, _ = _scaled_step(None, batch)
    scaled, net1, w1, precision = _scaled_step(scale, batch)
    assert scaled.applied and precision.loss_scale == scale
    for m in ("ct", "mr"):
        assert scaled.task_grad_norms[m] == pytest.approx(plain.task_grad_norms[m], rel=1e-6)
    torch.testing.assert_close(w1.w.detach(), w0.w.detach(), rtol=1e-6, atol=0)
    assert not torch.equal(w1.w.detach(), torch.ones(2))
    for (k, a), (_, b) in zip(net0.state_dict().items(), net1.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=k)


def test_overflowing_scaled_step_is_skipped_and_leaves_gradnorm_untouched():
    # a large loss at a large scale: the scaled gradients overflow, as in an fp16 step whose scale is too high
    res, net, weighting, precision = _scaled_step(2.0 ** 120, _batch(2), loss_factor=1e6)
    assert not res.applied and not math.isfinite(res.task_grad_norms["ct"])
    assert precision.loss_scale == 2.0 ** 119  # the scaler backed off
    torch.testing.assert_close(weighting.w.detach(), torch.ones(2), rtol=0, atol=0)
    assert int(weighting.initial_loss_count) == 0 and weighting.last == {}


def test_non_finite_norms_never_reach_the_weights():
    cfg = validate_config({"weighting": {"method": "gradnorm"}}).weighting
    gn = GradNorm(cfg=cfg, tasks=("ct", "mr"))
    gn.after_step({"ct": 1.0, "mr": 1.0}, {"ct": float("inf"), "mr": 1.0}, applied=True)
    torch.testing.assert_close(gn.w.detach(), torch.ones(2), rtol=0, atol=0)
