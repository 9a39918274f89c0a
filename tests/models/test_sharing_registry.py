"""The sharing registry and the config union name the same mechanisms, and what a mechanism's config
declares (dual path, shared depths) is what the built network does."""

from typing import get_args, get_type_hints

import pytest
import torch

from medmtl.config import SharingConfig, validate_config
from medmtl.modality import MODALITIES
from medmtl.models.two_column import TwoColumnNet
from medmtl.sharing import MECHANISMS

SMALL = {"model": {"channels": [4, 8, 16], "num_res_units": 1}}

SECTIONS = {
    "single_task": [],
    "soft": [{"kind": "soft", "depths": {"enc0": 1.0, "enc1": 1.0}}],
    "hard_all": [{"kind": "hard", "depths": "all"}],
    "hard_encoder": [{"kind": "hard", "depths": ["enc0", "enc1"]}],
    "shared_kernels": [{"kind": "shared_kernels", "depths": ["bottleneck", "dec1"]}],
    "cross_stitch": [{"kind": "cross_stitch", "depths": ["enc1", "bottleneck"]}],
    "sluice": [{"kind": "sluice", "depths": ["enc1"], "beta_depths": {"enc0": 0.1, "dec0": 0.9}}],
    "soft+cross_stitch": [{"kind": "soft", "depths": {"dec0": 1.0}}, {"kind": "cross_stitch", "depths": ["enc0"]}],
    "lora": [{"kind": "lora", "depths": ["enc1", "dec0"]}],
    "lora_mr_shared_norms": [{"kind": "lora", "modalities": ["mr"], "modality_norms": False}],
    "mtlora": [{"kind": "mtlora", "rank": 2, "shared_rank": 2}],
    "mixture_of_lora": [{"kind": "mixture_of_lora", "depths": ["bottleneck", "dec1"], "num_experts": 3}],
    "lora+cross_stitch": [{"kind": "lora", "depths": ["dec0"]}, {"kind": "cross_stitch", "depths": ["enc1"]}],
}


def test_every_config_kind_is_registered_with_its_config_class():
    union = get_args(get_args(SharingConfig)[0])
    assert {c.model_fields["kind"].default for c in union} == set(MECHANISMS)
    for cls in union:
        mech = MECHANISMS[cls.model_fields["kind"].default]
        assert get_type_hints(mech.__init__)["cfg"] is cls


def test_every_mechanism_is_covered_here():
    assert {m["kind"] for s in SECTIONS.values() for m in s} == set(MECHANISMS)


@pytest.mark.parametrize("name", list(SECTIONS))
def test_declared_capabilities_match_the_network(name):
    torch.manual_seed(0)
    cfg = validate_config({**SMALL, "sharing": SECTIONS[name]})
    net = TwoColumnNet(cfg=cfg)
    assert net.dual_path == cfg.mixes_activations
    # parameters each task's loss actually reaches, by autograd
    params = [p for p in net.parameters() if p.requires_grad]
    reached = {}
    for m in MODALITIES:
        x = torch.randn(1, 1, 8, 8, 8)
        grads = torch.autograd.grad(net(x, m).square().mean(), params, allow_unused=True)
        reached[m] = {id(p) for p, g in zip(params, grads) if g is not None}
        assert reached[m] == {id(p) for p in net.task_parameters(m)}, m
    both = reached["ct"] & reached["mr"]
    assert {id(p) for p in net.shared_parameters()} == both
    # the config's shared depths are exactly the stages with parameters on both paths
    stage_shared = [d for d in net.depth_names
                    if any(id(p) in both for m in MODALITIES for p in net.columns[m].stages[d].parameters())]
    assert cfg.shared_depths == stage_shared
