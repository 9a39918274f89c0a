"""The training step: non-finite gradients skip the step (counted), penalties reach the parameters."""

import torch
from monai.losses import DiceCELoss

from medmtl.config import validate_config
from medmtl.errors import ConfigError
from medmtl.models.two_column import TwoColumnNet
from medmtl.training.precision import Precision
from medmtl.training.step import train_step
from medmtl.weighting import build_weighting


def _setup(sharing=()):
    torch.manual_seed(0)
    cfg = validate_config({"model": {"channels": [4, 8, 16], "num_res_units": 0}, "sharing": list(sharing)})
    net = TwoColumnNet(cfg=cfg)
    return cfg, net, build_weighting(cfg.weighting, ("ct", "mr")), DiceCELoss(to_onehot_y=True, softmax=True)


def _batch(bad=False):
    g = torch.Generator().manual_seed(0)
    b = {m: {"image": torch.randn(1, 1, 16, 16, 8, generator=g), "label": torch.randint(0, 5, (1, 1, 16, 16, 8), generator=g)} for m in ("ct", "mr")}
    if bad:
        b["mr"]["image"][0, 0, 0, 0, 0] = float("nan")
    return b


def test_non_finite_step_is_skipped_and_parameters_unchanged():
    cfg, net, w, loss = _setup()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = train_step(net=net, batch=_batch(bad=True), loss_fn=loss, weighting=w, optimizer=opt,
                     precision=Precision("fp32", torch.device("cpu")), grad_clip=1.0, device=torch.device("cpu"))
    assert not res.applied
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    res = train_step(net=net, batch=_batch(), loss_fn=loss, weighting=w, optimizer=opt,
                     precision=Precision("fp32", torch.device("cpu")), grad_clip=1.0, device=torch.device("cpu"))
    assert res.applied and any(not torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_penalty_gradient_is_added_to_the_task_gradients():
    cfg, net, w, loss = _setup([{"kind": "soft", "depths": {"enc0": 10.0}}])
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    res = train_step(net=net, batch=_batch(), loss_fn=loss, weighting=w, optimizer=opt,
                     precision=Precision("fp32", torch.device("cpu")), grad_clip=None, device=torch.device("cpu"))
    assert set(res.penalties) == {"soft/enc0"} and res.penalties["soft/enc0"] > 0
    with_pen = net.columns["mr"].stages["enc0"].block.conv.weight.grad.clone()
    cfg2, net2, w2, _ = _setup()
    net2.load_state_dict(net.state_dict())
    train_step(net=net2, batch=_batch(), loss_fn=loss, weighting=w2, optimizer=torch.optim.SGD(net2.parameters(), lr=0.0),
               precision=Precision("fp32", torch.device("cpu")), grad_clip=None, device=torch.device("cpu"))
    without = net2.columns["mr"].stages["enc0"].block.conv.weight.grad
    a = net.columns["ct"].stages["enc0"].block.conv.weight
    b = net.columns["mr"].stages["enc0"].block.conv.weight
    torch.testing.assert_close(with_pen - without, -2 * 10.0 * (a - b).detach(), rtol=1e-4, atol=1e-6)


def test_bf16_autocast_runs_on_cpu_and_fp16_is_refused_there():
    cfg, net, w, loss = _setup()
    res = train_step(net=net, batch=_batch(), loss_fn=loss, weighting=w, optimizer=torch.optim.AdamW(net.parameters()),
                     precision=Precision("bf16", torch.device("cpu")), grad_clip=12.0, device=torch.device("cpu"))
    assert res.applied and all(torch.isfinite(torch.tensor(v)) for v in res.losses.values())
    import pytest

    with pytest.raises(ConfigError, match="train.precision=fp16"):
        Precision("fp16", torch.device("cpu"))


def test_fp16_overflow_step_is_skipped_counted_and_leaves_weighting_untouched():
    """The fp16 path on CPU: a GradScaler (CPU device) with a gradient that overflows to inf."""
    import pytest

    from medmtl.config import validate_config
    from medmtl.training.step import GradientProbe

    torch.manual_seed(0)
    cfg = validate_config({"model": {"channels": [4, 8, 16], "num_res_units": 0}, "weighting": {"method": "gradnorm"}})
    net = TwoColumnNet(cfg=cfg)
    weighting = build_weighting(cfg.weighting, ("ct", "mr"))
    precision = Precision("fp32", torch.device("cpu"))
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # what fp16 uses on CUDA
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    w_before = weighting.w.detach().clone()
    target = net.columns["mr"].stages["enc0"].block.conv.weight
    handle = target.register_hook(lambda g: g * float("inf"))  # an fp16 overflow in the MR backward
    res = train_step(net=net, batch=_batch(), loss_fn=DiceCELoss(to_onehot_y=True, softmax=True), weighting=weighting,
                     optimizer=opt, precision=precision, grad_clip=12.0, probe=GradientProbe(net.depth_parameters("bottleneck")),
                     device=torch.device("cpu"))
    handle.remove()
    assert not res.applied
    assert precision.scaler.get_scale() == pytest.approx(2.0**15)  # the scaler backed off
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    torch.testing.assert_close(weighting.w.detach(), w_before, rtol=0, atol=0)
    # the norms handed to GradNorm are of unscaled gradients: divide by the loss scale of that step
    assert res.task_grad_norms["ct"] < 1e3
    res = train_step(net=net, batch=_batch(), loss_fn=DiceCELoss(to_onehot_y=True, softmax=True), weighting=weighting,
                     optimizer=opt, precision=precision, grad_clip=12.0, probe=GradientProbe(net.depth_parameters("bottleneck")),
                     device=torch.device("cpu"))
    assert res.applied and not torch.equal(weighting.w.detach(), w_before)
