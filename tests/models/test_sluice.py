"""Sluice units: reduction to cross-stitch, the orthogonality penalty by hand, gradients, initialization."""

import pytest
import torch

from medmtl.config import validate_config
from medmtl.models.two_column import TwoColumnNet
from medmtl.sharing.sluice import subspace_orthogonality

SMALL = {"model": {"channels": [4, 8, 16], "num_res_units": 1}}
DEPTHS = ["enc0", "bottleneck", "dec1"]


def _cfg(sharing):
    return validate_config({**SMALL, "sharing": sharing})


def _x(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 16, 16, 8, generator=g)


def test_sluice_with_one_subspace_and_one_hot_beta_is_scalar_cross_stitch():
    torch.manual_seed(0)
    stitch = TwoColumnNet(cfg=_cfg([{"kind": "cross_stitch", "depths": DEPTHS, "per_channel": False}])).eval()
    sluice = TwoColumnNet(cfg=_cfg([{"kind": "sluice", "depths": DEPTHS, "num_subspaces": 1, "beta_depths": {"dec0": 1.0}}])).eval()
    sluice.load_state_dict({k: v for k, v in stitch.state_dict().items() if not k.startswith("sharing.")}, strict=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for d in DEPTHS:  # the same non-trivial coefficients in both
            a = torch.rand(2, 2, generator=g) + 0.1
            stitch.sharing[0].alpha[d].copy_(a[None])
            sluice.sharing[0].alpha[d].copy_(a)
    # float64: the matmul of the (2, 2) alpha and the elementwise cross-stitch round differently in float32
    stitch, sluice = stitch.double(), sluice.double()
    for m in ("ct", "mr"):
        x = _x(7).double()
        torch.testing.assert_close(sluice(x, m), stitch(x, m), rtol=1e-12, atol=1e-12)
    assert sluice.penalties() == {}


def test_beta_mixes_the_configured_layers_of_the_own_column():
    torch.manual_seed(0)
    net = TwoColumnNet(cfg=_cfg([{"kind": "sluice", "depths": ["enc1"], "beta_depths": {"enc0": 0.25, "dec0": 0.5}}])).eval()
    mech = net.sharing[0]
    x = _x(1)
    layers = net._run(x, "mr", {"enc0", "dec0"})
    torch.testing.assert_close(net.features(x, "mr"), 0.25 * layers["enc0"] + 0.5 * layers["dec0"])
    soft = TwoColumnNet(cfg=_cfg([{"kind": "sluice", "depths": ["enc1"], "beta_mode": "softmax", "beta_depths": {"enc0": 1.0, "dec0": 3.0}}]))
    torch.testing.assert_close(soft.sharing[0].beta_weights("ct"), torch.tensor([0.25, 0.75]))
    assert mech.head_input_depths() == ["enc0", "dec0"]


def _hand_orthogonality(weight, m):
    g = weight.detach().double().reshape(weight.shape[0], -1).T  # (fan_in, C): columns are filters
    size = g.shape[1] // m
    blocks = [g[:, i * size:(i + 1) * size] for i in range(m)]
    return sum(float((blocks[i].T @ blocks[j]).square().sum()) for i in range(m) for j in range(i + 1, m))


@pytest.mark.parametrize("m", [2, 4])
def test_orthogonality_penalty_equals_hand_computation(m):
    torch.manual_seed(0)
    net = TwoColumnNet(cfg=_cfg([{"kind": "sluice", "depths": ["enc1", "dec1"], "num_subspaces": m, "orthogonality_weight": 0.7}]))
    pens = net.penalties()
    assert set(pens) == {"sluice/enc1", "sluice/dec1"}
    for depth in ("enc1", "dec1"):
        hand = 0.0
        for col in ("ct", "mr"):
            block = net.columns[col].stages[depth].block
            # the filters that write the stage's output: last conv of the main path and the residual projection
            for conv in (block.conv.unit1.conv, block.residual):
                hand += _hand_orthogonality(conv.weight, m)
        assert float(pens[f"sluice/{depth}"].detach()) == pytest.approx(0.7 * hand, rel=1e-5)
    logged = net.sharing_log_values()
    assert logged["sluice/enc1/orthogonality/ct"] > 0 and "sluice/dec1/orthogonality/mr" in logged


def test_orthogonality_is_zero_for_orthogonal_subspaces_and_passes_gradcheck():
    w = torch.zeros(4, 2, 1, 1, 1, dtype=torch.float64)
    w[:2, 0], w[2:, 1] = 1.0, 1.0  # subspace 0 reads input channel 0 only, subspace 1 channel 1 only
    assert float(subspace_orthogonality(w, 2)) == 0.0
    x = torch.randn(4, 3, 1, 1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: subspace_orthogonality(t, 2), (x,), eps=1e-6, atol=1e-6)


def test_gradients_reach_alpha_beta_and_the_penalty_reaches_the_filters():
    torch.manual_seed(0)
    net = TwoColumnNet(cfg=_cfg([{"kind": "sluice", "depths": ["enc0", "enc1", "bottleneck", "dec1"], "num_subspaces": 2}]))
    mech = net.sharing[0]
    loss = net(_x(3), "ct").square().mean() + net(_x(4), "mr").square().mean()
    loss.backward()
    for depth, alpha in mech.alpha.items():
        assert alpha.shape == (4, 4)
        assert alpha.grad is not None and bool((alpha.grad != 0).all()), depth
    for m, beta in mech.beta.items():
        assert beta.grad is not None and bool((beta.grad != 0).all()), m
    net.zero_grad()
    torch.stack(list(net.penalties().values())).sum().backward()
    assert net.columns["mr"].stages["enc1"].block.residual.weight.grad.abs().sum() > 0


def test_alpha_init_lr_group_and_logged_coefficients():
    cfg = _cfg([{"kind": "sluice", "depths": ["enc1"], "num_subspaces": 2, "init": [[0.8, 0.2], [0.3, 0.7]], "lr_multiplier": 4.0}])
    net = TwoColumnNet(cfg=cfg)
    mech = net.sharing[0]
    expected = torch.tensor([[0.8, 0, 0.2, 0], [0, 0.8, 0, 0.2], [0.3, 0, 0.7, 0], [0, 0.3, 0, 0.7]])
    torch.testing.assert_close(mech.alpha["enc1"].detach(), expected)
    groups = net.param_groups(1e-3, 1e-5)
    g = [g for g in groups if g["name"] == "sharing/sluice"][0]
    assert g["lr"] == pytest.approx(4e-3) and g["weight_decay"] == 0.0 and len(g["params"]) == 3
    assert not {id(p) for p in g["params"]} & {id(p) for p in groups[0]["params"]}
    vals = net.sharing_log_values()
    assert vals["sluice/enc1/alpha/ct0<-mr0"] == pytest.approx(0.2)
    assert vals["sluice/beta/ct/dec0"] == pytest.approx(0.9)
    assert net.dual_path


def test_sluice_combines_with_soft_penalties_at_other_depths():
    net = TwoColumnNet(cfg=_cfg([{"kind": "soft", "depths": {"enc0": 1.0}}, {"kind": "sluice", "depths": ["dec1"]}]))
    assert set(net.penalties()) == {"soft/enc0", "sluice/dec1"}
    assert net(_x(), "ct").shape == (2, 5, 16, 16, 8)
