"""Adaptation set-up: which sources are accepted, the adapted config, and a start exactly at the source's model."""

from __future__ import annotations

import pytest
import torch

from medmtl.config import validate_config
from medmtl.errors import ModelError
from medmtl.models.two_column import TwoColumnNet
from medmtl.training.adapt import adaptation_config, load_base, trainable_share


def _cfg(sharing):
    return validate_config({"model": {"channels": [4, 8, 16], "num_res_units": 1}, "preprocess": {"patch_size": [16, 16, 8]},
                            "sharing": sharing, "weighting": {"method": "gradnorm"}}, "test")


@pytest.mark.parametrize("sharing", [[{"kind": "cross_stitch", "depths": ["enc1"]}], [{"kind": "sluice", "depths": ["enc1"]}],
                                     [{"kind": "mixture_of_lora"}]])
def test_a_source_whose_columns_do_not_stand_alone_is_refused(sharing):
    with pytest.raises(ModelError, match="sharing.0"):
        adaptation_config(_cfg(sharing), target="mr", source="ct")


def test_adapted_config_trains_only_target_deltas_with_equal_weighting():
    cfg = adaptation_config(_cfg([{"kind": "soft", "depths": {"enc0": 1.0}}]), target="mr", source="ct",
                            lora={"rank": 2, "depths": ["bottleneck"]}, overrides=["train.steps=7"])
    (mech,) = cfg.sharing
    assert (mech.kind, mech.modalities, mech.freeze_base, mech.rank, mech.depths) == ("lora", ["mr"], True, 2, ["bottleneck"])
    assert cfg.weighting.method == "equal" and cfg.train.steps == 7


def test_adapted_net_starts_as_the_source_modality_model_bit_for_bit():
    src_cfg = _cfg([{"kind": "soft", "depths": {"enc0": 1.0}}])
    torch.manual_seed(0)
    source = TwoColumnNet(cfg=src_cfg).eval()
    cfg = adaptation_config(src_cfg, target="mr", source="ct", lora={"rank": 2})
    torch.manual_seed(1)
    net = TwoColumnNet(cfg=cfg)
    load_base(net, source.state_dict(), "ct")
    net.eval()
    x = torch.randn(2, 1, 16, 16, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(net(x, "ct"), source(x, "ct"))
        assert torch.equal(net(x, "mr"), source(x, "ct"))  # B = 0: the MR path is the CT model
    share = trainable_share(net)
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in net.sharing[0].adapter_parameters()}
    assert 0 < share["params/trainable_fraction"] < 1
