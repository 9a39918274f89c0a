"""Two-column net and sharing mechanisms: routing, exact penalties, gradients, tied parameters."""


import pytest
import torch

from medmtl.config import validate_config
from medmtl.models.column import Column
from medmtl.models.two_column import TwoColumnNet
from medmtl.sharing.soft import penalized_parameters

SMALL = {"model": {"channels": [4, 8, 16], "num_res_units": 1}}


def _cfg(sharing, **extra):
    return validate_config({**SMALL, "sharing": sharing, **extra})


def _x(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 16, 16, 8, generator=g)


def test_stages_are_named_and_addressable():
    col = Column(cfg=_cfg([]).model)
    assert col.depth_names == ["enc0", "enc1", "bottleneck", "dec1", "dec0"]
    assert set(col.stages.keys()) == set(col.depth_names)
    out = col(_x())
    assert out.shape == (2, 4, 16, 16, 8)


def test_identity_cross_stitch_equals_two_independent_columns():
    torch.manual_seed(0)
    plain = TwoColumnNet(cfg=_cfg([])).eval()
    mixed = TwoColumnNet(cfg=_cfg([{"kind": "cross_stitch", "depths": ["enc0", "bottleneck", "dec1"], "init": [[1, 0], [0, 1]]}])).eval()
    mixed.load_state_dict(plain.state_dict(), strict=False)
    assert mixed.dual_path and not plain.dual_path
    for m in ("ct", "mr"):
        x = _x(1)
        independent = plain.heads[m](plain.columns[m](x))
        torch.testing.assert_close(mixed(x, m), independent, rtol=0, atol=0)
        torch.testing.assert_close(plain(x, m), independent, rtol=0, atol=0)


def test_non_identity_cross_stitch_mixes_the_other_column_in():
    torch.manual_seed(0)
    cfg = _cfg([{"kind": "cross_stitch", "depths": ["enc1"]}])
    net = TwoColumnNet(cfg=cfg).eval()
    x = _x(2)
    y = net(x, "ct")
    with torch.no_grad():
        for p in net.columns["mr"].stages["enc0"].parameters():
            p.add_(0.5)
    assert not torch.allclose(net(x, "ct"), y), "the CT readout must depend on the MR column through the mixing"


def test_soft_penalty_is_zero_for_identical_columns_and_matches_hand_computation():
    torch.manual_seed(0)
    lam = {"enc0": 0.5, "dec0": 2.0}
    net = TwoColumnNet(cfg=_cfg([{"kind": "soft", "depths": lam, "exclude_norm_and_bias": True}]))
    net.columns["mr"].load_state_dict(net.columns["ct"].state_dict())
    pens = net.penalties()
    assert set(pens) == {"soft/enc0", "soft/dec0"}
    assert all(float(v.detach()) == 0.0 for v in pens.values())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.columns["mr"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    pens = net.penalties()
    for depth, weight in lam.items():
        a = penalized_parameters(net.columns["ct"].stages[depth], exclude_norm_and_bias=True)
        b = penalized_parameters(net.columns["mr"].stages[depth], exclude_norm_and_bias=True)
        assert all("norm" not in n.lower() and not n.endswith("bias") for n, _ in a)
        hand = weight * sum(float(((pa.detach().double() - pb.detach().double()) ** 2).sum()) for (_, pa), (_, pb) in zip(a, b))
        assert float(pens[f"soft/{depth}"].detach()) == pytest.approx(hand, rel=1e-5)


def test_soft_penalty_can_include_norms_and_biases():
    net_ex = TwoColumnNet(cfg=_cfg([{"kind": "soft", "depths": {"enc0": 1.0}, "exclude_norm_and_bias": True}]))
    net_in = TwoColumnNet(cfg=_cfg([{"kind": "soft", "depths": {"enc0": 1.0}, "exclude_norm_and_bias": False}]))
    n_ex = len(penalized_parameters(net_ex.columns["ct"].stages["enc0"], exclude_norm_and_bias=True))
    n_in = len(penalized_parameters(net_in.columns["ct"].stages["enc0"], exclude_norm_and_bias=False))
    assert n_in > n_ex


def test_soft_penalty_gradient_passes_gradcheck_in_float64():
    net = TwoColumnNet(cfg=_cfg([{"kind": "soft", "depths": {"enc1": 0.3}}])).double()
    mech = net.sharing[0]
    a, b = mech._pairs["enc1"]

    n = len(a)
    original = dict(mech._pairs)

    def f(*ps):
        # run the module's own penalty code on the gradcheck inputs
        mech._pairs = {"enc1": (list(ps[:n]), list(ps[n:]))}
        return mech.penalties()["enc1"]

    inputs = tuple(t.detach().clone()[..., :1].contiguous().requires_grad_(True) for t in a + b)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)
    mech._pairs = original
    # and the module's own gradient equals the analytic 2*lambda*(theta_ct - theta_mr)
    net.zero_grad()
    net.penalties()["soft/enc1"].backward()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.grad, 2 * 0.3 * (pa - pb).detach())
        torch.testing.assert_close(pb.grad, -2 * 0.3 * (pa - pb).detach())


def test_gradients_reach_every_cross_stitch_coefficient():
    torch.manual_seed(0)
    net = TwoColumnNet(cfg=_cfg([{"kind": "cross_stitch", "depths": ["enc0", "enc1", "bottleneck", "dec1"]}]))
    loss = net(_x(3), "ct").square().mean() + net(_x(4), "mr").square().mean()
    loss.backward()
    for depth, alpha in net.sharing[0].alpha.items():
        assert alpha.shape[1:] == (2, 2)
        assert alpha.grad is not None and bool((alpha.grad != 0).all()), depth


def test_cross_stitch_init_is_near_identity_and_has_its_own_lr_group():
    cfg = _cfg([{"kind": "cross_stitch", "depths": ["enc1"], "lr_multiplier": 5.0}])
    net = TwoColumnNet(cfg=cfg)
    a = net.sharing[0].alpha["enc1"]
    assert a.shape == (8, 2, 2)
    torch.testing.assert_close(a[0], torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    groups = net.param_groups(1e-3, 1e-5)
    cs = [g for g in groups if g["name"] == "sharing/cross_stitch"][0]
    assert cs["lr"] == pytest.approx(5e-3) and cs["weight_decay"] == 0.0
    net_ids = {id(p) for p in groups[0]["params"]}
    assert id(a) not in net_ids
    scalar = TwoColumnNet(cfg=_cfg([{"kind": "cross_stitch", "depths": ["enc1"], "per_channel": False}]))
    assert scalar.sharing[0].alpha["enc1"].shape == (1, 2, 2)


def test_hard_sharing_all_is_one_column_with_two_heads():
    net = TwoColumnNet(cfg=_cfg([{"kind": "hard"}]))
    for d in net.depth_names:
        assert net.columns["ct"].stages[d] is net.columns["mr"].stages[d]
    assert net.heads["ct"] is not net.heads["mr"]
    single = TwoColumnNet(cfg=_cfg([]))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(net) == n(single.columns["ct"]) + n(single.heads["ct"]) + n(single.heads["mr"])


def test_shared_kernels_share_convolutions_but_not_normalization():
    net = TwoColumnNet(cfg=_cfg([{"kind": "shared_kernels"}]))
    ct, mr = net.columns["ct"], net.columns["mr"]
    conv_ct = [m for m in ct.modules() if isinstance(m, torch.nn.Conv3d)]
    conv_mr = [m for m in mr.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(a is b for a, b in zip(conv_ct, conv_mr, strict=True))
    norm_ct = [m for m in ct.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    norm_mr = [m for m in mr.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norm_ct and all(a is not b for a, b in zip(norm_ct, norm_mr, strict=True))
    # an update through the CT loss moves the MR column's kernels too
    before = conv_mr[0].weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(_x(), "ct").mean().backward()
    opt.step()
    assert not torch.equal(before, conv_mr[0].weight)


def test_single_task_columns_are_independent():
    net = TwoColumnNet(cfg=_cfg([]))
    net(_x(), "ct").mean().backward()
    assert all(p.grad is None for p in net.columns["mr"].parameters())
    assert all(p.grad is not None for p in net.columns["ct"].parameters())


def test_penalties_and_mixing_combine_at_different_depths():
    net = TwoColumnNet(cfg=_cfg([{"kind": "soft", "depths": {"enc0": 1.0}}, {"kind": "cross_stitch", "depths": ["bottleneck"]}]))
    assert set(net.penalties()) == {"soft/enc0"}
    vals = net.sharing_log_values()
    assert "cross_stitch/bottleneck/ct_mr" in vals and not any(k.startswith("soft/") for k in vals)  # soft: penalty/soft/<depth> only
    assert vals["cross_stitch/bottleneck/ct_mr"] == pytest.approx(0.1)


def test_dual_path_skips_the_other_columns_stages_after_the_last_mixing_depth():
    net = TwoColumnNet(cfg=_cfg([{"kind": "cross_stitch", "depths": ["enc1"]}]))
    net(_x(), "ct").mean().backward()
    mr = net.columns["mr"].stages
    assert all(p.grad is not None for d in ("enc0", "enc1") for p in mr[d].parameters())
    assert all(p.grad is None for d in ("bottleneck", "dec1", "dec0") for p in mr[d].parameters())
