"""Every method's state survives a checkpoint round trip (torch.save / torch.load(weights_only=True))."""

import io

import pytest
import torch

from medmtl.weighting import METHODS

SETTINGS = {
    "equal": {},
    "gradnorm": {"initial_loss_steps": 3},
    "uncertainty": {"lr": 0.05},
    "dwa": {"steps_per_epoch": 4},
    "dst": {"max_drop_probability": 0.9, "progress_share": 0.5, "stall_patience": 3, "seed": 5},
    "metabalance": {"main_task": "mr", "relax_factor": 0.8, "beta": 0.7},
    "pcgrad": {"seed": 3},
    "cagrad": {"c": 0.5},
}


def test_every_method_has_a_round_trip_setting():
    assert set(SETTINGS) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_state_survives_a_checkpoint_round_trip(toy, method):
    weighting = {"method": method, **SETTINGS[method]}
    a = toy(weighting, seed=0)
    for _ in range(25):  # past GradNorm's L_i(0) window, several DWA epochs, some DST drops
        a.step()
    buf = io.BytesIO()
    torch.save({"net": a.net.state_dict(), "opt": a.optimizer.state_dict(), "weighting": a.weighting.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    # a fresh problem (different init) restored from the checkpoint, fed the same stream from here on
    b = toy(weighting, seed=1)
    b.gen.set_state(a.gen.get_state())
    b.a, b.b = a.a, a.b
    b.net.load_state_dict(state["net"])
    b.weighting.load_state_dict(state["weighting"])
    b.optimizer.load_state_dict(state["opt"])
    for _ in range(15):
        ra, rb = a.step(), b.step()
        assert ra.losses == rb.losses
        torch.testing.assert_close(b.weighting.weights, a.weighting.weights, rtol=0, atol=0)
    assert a.weighting.log_values() == b.weighting.log_values()
    for k, v in a.weighting.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(b.weighting.state_dict()[k], v, rtol=0, atol=0, msg=k)
