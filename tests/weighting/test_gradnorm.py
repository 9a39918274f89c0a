"""GradNorm: measured norms equal autograd's, one update equals the published formula by hand."""

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
