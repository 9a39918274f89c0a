"""Deep supervision: auxiliary head shapes, nnU-Net weights, and the combined loss by hand."""

import pytest
import torch
from monai.losses import DiceCELoss

from medmtl.config import validate_config
from medmtl.models.deep_supervision import deep_supervision_loss, deep_supervision_weights
from medmtl.models.two_column import TwoColumnNet


def _net(channels, aux, sharing=()):
    return TwoColumnNet(cfg=validate_config({"model": {"channels": channels, "num_res_units": 0, "deep_supervision_depths": aux},
                                             "sharing": list(sharing)}))


def _xy(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 16, 16, 8, generator=g), torch.randint(0, 5, (2, 1, 16, 16, 8), generator=g)


def test_weights_halve_per_level_and_sum_to_one():
    assert deep_supervision_weights([]) == {"main": 1.0}
    w = deep_supervision_weights(["dec1", "dec2"])
    assert w == pytest.approx({"main": 1 / 1.75, "dec1": 0.5 / 1.75, "dec2": 0.25 / 1.75})


@pytest.mark.parametrize("sharing", [[], [{"kind": "sluice", "depths": ["enc1"]}]], ids=["single", "sluice"])
def test_aux_heads_have_decoder_resolutions_and_main_equals_forward(sharing):
    torch.manual_seed(0)
    net = _net([4, 8, 16, 32], ["dec1", "dec2"], sharing).eval()
    x, _ = _xy()
    out = net.forward_with_aux(x, "ct")
    assert list(out) == ["main", "dec1", "dec2"] == list(net.deep_supervision_weights)
    assert out["main"].shape == (2, 5, 16, 16, 8)
    assert out["dec1"].shape == (2, 5, 8, 8, 4)
    assert out["dec2"].shape == (2, 5, 4, 4, 2)
    torch.testing.assert_close(out["main"], net(x, "ct"), rtol=0, atol=0)


def test_combined_loss_equals_hand_weighted_sum_and_reaches_aux_heads():
    torch.manual_seed(0)
    net = _net([4, 8, 16], ["dec1"])
    x, y = _xy(1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    out = net.forward_with_aux(x, "mr")
    total = deep_supervision_loss(loss_fn, out, y, net.deep_supervision_weights)
    # nearest-neighbour halving keeps every second voxel
    hand = 2 / 3 * loss_fn(out["main"], y) + 1 / 3 * loss_fn(out["dec1"], y[:, :, ::2, ::2, ::2])
    torch.testing.assert_close(total, hand)
    total.backward()
    assert net.aux_heads["mr"]["dec1"].weight.grad.abs().sum() > 0
    assert net.aux_heads["ct"]["dec1"].weight.grad is None


def test_without_deep_supervision_the_loss_is_the_plain_loss():
    torch.manual_seed(0)
    net = _net([4, 8, 16], [])
    x, y = _xy(2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    out = net.forward_with_aux(x, "ct")
    assert list(out) == ["main"] and len(list(net.aux_heads.parameters())) == 0
    torch.testing.assert_close(deep_supervision_loss(loss_fn, out, y, net.deep_supervision_weights), loss_fn(out["main"], y))
