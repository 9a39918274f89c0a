"""LoRA-family sharing: zero-init equals the shared column bit for bit, the delta formula, frozen-base
gradients, merge equals unmerged, the router's gates and balance loss, and every shipped config trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmtl.config import load_config, validate_config
from medmtl.models.merge import merge_adapters, parameter_counts, plain_state_dict
from medmtl.modality import MODALITIES
from medmtl.models.two_column import TwoColumnNet
from medmtl.sharing.lora_layers import LoRAConv, LowRankDelta
from medmtl.sharing.routing import TopKRouter, balance_loss, router_entropy

ROOT = Path(__file__).resolve().parents[2]
LORA_CONFIGS = ["abdomen_lora", "abdomen_mtlora", "abdomen_mixture_of_lora"]


def _cfg(sharing: list[dict], **model):
    raw = {"model": {"channels": [4, 8, 16], "num_res_units": 1, **model}, "preprocess": {"patch_size": [16, 16, 8]},
           "sharing": sharing}
    return validate_config(raw, "test")


def _net(sharing: list[dict], seed: int = 0, **model) -> TwoColumnNet:
    torch.manual_seed(seed)
    return TwoColumnNet(cfg=_cfg(sharing, **model))


def _randomize_deltas(net: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LowRankDelta):
                m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))


def _x(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 1, 16, 16, 8, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("conv", [nn.Conv3d(3, 5, 3, padding=1, stride=2), nn.ConvTranspose3d(6, 4, 3, stride=2, padding=1, output_padding=1)])
def test_zero_initialised_delta_leaves_the_convolution_bit_for_bit(conv):
    torch.manual_seed(0)
    wrapped = LoRAConv(base=conv, deltas=[LowRankDelta(weight_shape=tuple(conv.weight.shape), rank=2, alpha=4.0)])
    x = torch.randn(2, conv.in_channels, 6, 6, 4)
    assert torch.equal(wrapped(x), conv(x))


@pytest.mark.parametrize("conv", [nn.Conv3d(3, 5, 3, padding=1), nn.ConvTranspose3d(6, 4, 3, stride=2, padding=1, output_padding=1)])
def test_delta_is_alpha_over_r_times_b_a(conv):
    torch.manual_seed(0)
    rank, alpha = 2, 6.0
    d = LowRankDelta(weight_shape=tuple(conv.weight.shape), rank=rank, alpha=alpha)
    with torch.no_grad():
        d.lora_B.normal_()
    w = conv.weight
    rows, cols = w.shape[0], w[0].numel()
    by_hand = torch.zeros(rows, cols)
    for o in range(rows):
        for c in range(cols):
            by_hand[o, c] = alpha / rank * sum(float(d.lora_B[o, j].detach()) * float(d.lora_A[j, c].detach()) for j in range(rank))
    torch.testing.assert_close(d.delta(), by_hand.reshape(w.shape), rtol=1e-5, atol=1e-6)
    # and the wrapped convolution is the base convolution with that kernel
    x = torch.randn(2, conv.in_channels, 5, 5, 3)
    wrapped = LoRAConv(base=conv, deltas=[d])
    if isinstance(conv, nn.ConvTranspose3d):
        ref = F.conv_transpose3d(x, w + by_hand.reshape(w.shape), conv.bias, 2, 1, 1)
    else:
        ref = F.conv3d(x, w + by_hand.reshape(w.shape), conv.bias, 1, 1)
    torch.testing.assert_close(wrapped(x), ref, rtol=1e-5, atol=1e-5)


def test_per_sample_gated_kernels_match_one_sample_at_a_time():
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 4, 3, padding=1)
    experts = [LowRankDelta(weight_shape=tuple(conv.weight.shape), rank=2, alpha=2.0) for _ in range(3)]
    for e in experts:
        nn.init.normal_(e.lora_B)
    gates = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
    wrapped = LoRAConv(base=conv, deltas=experts, gates=lambda: gates)
    x = torch.randn(2, 3, 5, 5, 4)
    for b in range(2):
        kernel = conv.weight + sum(gates[b, e] * experts[e].delta() for e in range(3))
        torch.testing.assert_close(wrapped(x)[b : b + 1], F.conv3d(x[b : b + 1], kernel, conv.bias, padding=1), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- mechanisms
@pytest.mark.parametrize("sharing", [[{"kind": "lora"}], [{"kind": "mtlora"}], [{"kind": "lora", "modality_norms": False}]])
def test_zero_initialised_lora_net_equals_the_shared_column_bit_for_bit(sharing):
    net = _net(sharing)
    norms = sharing[0].get("modality_norms", True)
    shared = _net([{"kind": "shared_kernels"}] if norms else [{"kind": "hard"}])
    state = {k.replace(".base.", "."): v for k, v in net.state_dict().items() if ".deltas." not in k}
    shared.load_state_dict(state, strict=True)
    net.eval(), shared.eval()
    for m in MODALITIES:
        assert torch.equal(net(_x(), m), shared(_x(), m))


def test_every_convolution_of_the_chosen_depths_is_adapted_including_transposed():
    net = _net([{"kind": "lora", "depths": ["enc1", "dec0"]}])
    for m in MODALITIES:
        stages = net.columns[m].stages
        for depth in ("enc1", "dec0"):
            assert not [c for c in stages[depth].modules() if isinstance(c, (nn.Conv3d, nn.ConvTranspose3d))
                        and not any(c is w.base for w in stages[depth].modules() if isinstance(w, LoRAConv))]
        assert any(w.transposed for w in stages["dec0"].modules() if isinstance(w, LoRAConv))
        assert not any(isinstance(w, LoRAConv) for w in stages["enc0"].modules())
    # one shared column: the MR column's kernels are the CT column's
    ct_w = {id(p) for p in net.columns["ct"].parameters()}
    norms = {id(p) for m in net.columns["mr"].modules() if isinstance(m, nn.InstanceNorm3d) for p in m.parameters()}
    mr_w = {id(p) for n, p in net.columns["mr"].named_parameters() if ".deltas." not in n and id(p) not in norms}
    assert mr_w and mr_w <= ct_w and not norms & ct_w


@pytest.mark.parametrize("sharing", [{"kind": "lora", "modalities": ["mr"]}, {"kind": "mtlora"},
                                     {"kind": "mixture_of_lora", "depths": ["bottleneck", "dec1"]}])
def test_frozen_base_gradients_reach_only_the_adapters(sharing):
    net = _net([{**sharing, "freeze_base": True}])
    _randomize_deltas(net)
    adapters = {id(p) for mech in net.sharing for p in mech.adapter_parameters()}
    net.train()
    out = net(_x(), "mr")
    loss = out.square().mean() + sum(net.forward_losses().values(), torch.zeros(()))
    loss.backward()
    for name, p in net.named_parameters():
        if id(p) in adapters:
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters() if id(p) in adapters)


@pytest.mark.parametrize("sharing", [[{"kind": "lora"}], [{"kind": "mtlora", "shared_rank": 2, "rank": 3}],
                                     [{"kind": "lora", "depths": ["dec1", "dec0"]}, {"kind": "cross_stitch", "depths": ["enc1"]}]])
def test_merged_model_equals_unmerged(sharing):
    net = _net(sharing)
    _randomize_deltas(net)
    merged, cfg = merge_adapters(net, net_cfg := _cfg(sharing))
    assert [s.kind for s in cfg.sharing] == [s["kind"] for s in sharing if s["kind"] not in ("lora", "mtlora")]
    assert not any(isinstance(m, LoRAConv) for m in merged.modules())
    net.eval(), merged.eval()
    with torch.no_grad():
        for m in MODALITIES:
            torch.testing.assert_close(merged(_x(), m), net(_x(), m), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(net(_x(), m), _net(sharing)(_x(), m))  # the deltas did change the output
    # the merged state rebuilds from its config alone, as the deployed pyfunc does
    TwoColumnNet(cfg=cfg).load_state_dict(merged.state_dict(), strict=True)
    assert net_cfg.sharing[0].kind in ("lora", "mtlora")


def test_a_mixture_is_not_merged():
    net = _net([{"kind": "mixture_of_lora"}])
    merged, cfg = merge_adapters(net, c := _cfg([{"kind": "mixture_of_lora"}]))
    assert merged is net and cfg is c
    wrapper = next(m for m in net.modules() if isinstance(m, LoRAConv))
    with pytest.raises(ValueError, match="cannot be merged"):
        wrapper.merged()
    assert plain_state_dict(net, [0]).keys() == net.state_dict().keys()


# ---------------------------------------------------------------------------------------- routing
def test_router_gates_sum_to_one_over_the_top_k():
    torch.manual_seed(0)
    router = TopKRouter(in_channels=6, num_experts=5, top_k=2, num_modalities=2)
    nn.init.normal_(router.linear.weight)
    with torch.no_grad():
        r = router(torch.randn(7, 6, 4, 4, 2), modality=1)
    torch.testing.assert_close(r.gates.sum(1), torch.ones(7))
    assert ((r.gates > 0).sum(1) == 2).all()
    # renormalised top-k probabilities: the gate ratio is the probability ratio
    for b in range(7):
        i, j = r.indices[b].tolist()
        assert float(r.gates[b, i] / r.gates[b, j]) == pytest.approx(float(r.probs[b, i] / r.probs[b, j]), rel=1e-5)
        assert r.probs[b, i] >= r.probs[b].max() - 1e-7


def test_balance_loss_matches_its_formula():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    indices = torch.tensor([[0, 1], [1, 2], [0, 1], [2, 1]])
    k_experts, n, k = 3, 4, 2
    f = [sum(1 for b in range(n) for j in range(k) if indices[b, j] == i) / (n * k) for i in range(k_experts)]
    p = [sum(float(probs[b, i]) for b in range(n)) / n for i in range(k_experts)]
    by_hand = k_experts * sum(fi * pi for fi, pi in zip(f, p))
    assert float(balance_loss(probs, indices, k_experts)) == pytest.approx(by_hand, rel=1e-6)
    uniform = torch.full((4, 4), 0.25)
    assert float(balance_loss(uniform, torch.tensor([[0], [1], [2], [3]]), 4)) == pytest.approx(1.0)
    assert float(router_entropy(uniform)) == pytest.approx(float(torch.log(torch.tensor(4.0))))


def test_mixture_logs_usage_by_modality_entropy_and_balance_and_adds_its_loss():
    net = _net([{"kind": "mixture_of_lora", "depths": ["bottleneck"], "num_experts": 3, "top_k": 1, "balance_weight": 0.5}])
    net.train()
    for m in MODALITIES:
        net(_x(), m)
        losses = net.forward_losses()
        assert list(losses) == [f"mixture_of_lora/bottleneck/{m}"] and losses[f"mixture_of_lora/bottleneck/{m}"].requires_grad
    logged = net.sharing_log_values()
    for m in MODALITIES:
        usage = [logged[f"mixture_of_lora/bottleneck/{m}/usage/e{e}"] for e in range(3)]
        assert sum(usage) == pytest.approx(1.0)
        assert 0 <= logged[f"mixture_of_lora/bottleneck/{m}/entropy"] <= float(torch.log(torch.tensor(3.0))) + 1e-6
        assert 1.0 <= logged[f"mixture_of_lora/bottleneck/{m}/balance_loss"] <= 3.0
    assert net.sharing_log_values() == {}  # means since the last read
    net.eval()
    with torch.no_grad():
        net(_x(), "ct")
    assert net.forward_losses() == {} and net.sharing_log_values() == {}  # evaluation forwards are not counted


# -------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", LORA_CONFIGS)
def test_every_lora_config_builds_and_trains_a_step(name):
    from medmtl.training.parts import build_training_parts

    cfg = load_config(ROOT / "configs" / f"{name}.yaml", ["preprocess.patch_size=[32,32,16]"])
    torch.manual_seed(0)
    parts = build_training_parts(cfg, torch.device("cpu"))
    net = parts.net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batch = {m: {"image": torch.randn(2, 1, 32, 32, 16, generator=g), "label": torch.randint(0, 5, (2, 1, 32, 32, 16), generator=g)}
             for m in MODALITIES}
    r = parts.step(batch)
    assert r.applied and all(torch.isfinite(torch.tensor(v)) for v in r.losses.values())
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert any("lora_B" in k for k in changed) and any(".base.weight" in k for k in changed)
    counts = parameter_counts(net)
    assert counts["trainable"] == counts["total"]
