"""Config-time errors of the model and sharing sections: each a ConfigError naming the key."""

import pytest
import yaml

from medmtl.config import ConfigError, load_config, validate_config

SMALL = {"model": {"channels": [4, 8, 16]}}


def _err(raw) -> str:
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    return str(err.value)


@pytest.mark.parametrize("sharing, key, words", [
    ([{"kind": "sluice", "depths": ["enc1"], "beta_depths": {"enc9": 1.0}}], "sharing.0.beta_depths", ["'enc9'", "bottleneck"]),
    ([{"kind": "sluice", "depths": ["enc1"], "beta_depths": {"dec1": 1.0}}], "sharing.0.beta_depths", ["'dec1'", "enc0, dec0"]),
    ([{"kind": "sluice", "depths": ["enc1"], "num_subspaces": 3}], "sharing.0.num_subspaces", ["8 channels", "'enc1'"]),
    ([{"kind": "sluice", "depths": ["enc1"], "beta_mode": "softmax", "beta_depths": {"dec0": 0.0}}], "sharing.0.beta_depths", ["> 0"]),
    ([{"kind": "sluice", "depths": ["enc1"]}, {"kind": "cross_stitch", "depths": ["enc1"]}], "sharing.1.depths", ["already mixed by sharing.0"]),
    ([{"kind": "sluice", "depths": ["enc1"]}, {"kind": "sluice", "depths": ["dec1"]}], "sharing.1", ["only one mechanism"]),
    ([{"kind": "soft", "depths": {"enc0": 1.0}}, {"kind": "hard", "depths": ["enc0"]}], "sharing.0.depths", ["already shared by sharing.1"]),
    ([{"kind": "soft", "depths": {"dec0": 1.0}}, {"kind": "shared_kernels"}], "sharing.0.depths", ["already shared"]),
], ids=["beta-unknown", "beta-resolution", "subspaces", "softmax-init", "two-mixers", "two-betas", "soft-on-hard", "soft-on-kernels"])
def test_sharing_errors_name_the_key(sharing, key, words):
    msg = _err({**SMALL, "sharing": sharing})
    assert key in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("aux, words", [(["dec7"], "unknown depth"), (["dec0"], "below the main head"), (["enc1"], "not a decoder depth")])
def test_deep_supervision_depth_errors(aux, words):
    msg = _err({"model": {"channels": [4, 8, 16], "deep_supervision_depths": aux}})
    assert "model.deep_supervision_depths" in msg and words in msg


def test_patch_size_must_fit_the_levels_so_skip_shapes_match():
    msg = _err({"model": {"channels": [4, 8, 16, 32]}, "preprocess": {"patch_size": [64, 64, 12]}})
    assert "preprocess.patch_size" in msg and "divisible by 8" in msg


def test_error_from_a_file_names_the_file(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump({**SMALL, "sharing": [{"kind": "sluice", "depths": ["enc1"], "beta_depths": {"dec1": 1.0}}]}))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value) and "sharing.0.beta_depths" in str(err.value)


def test_unknown_sluice_key_is_named_without_the_union_tag():
    msg = _err({**SMALL, "sharing": [{"kind": "sluice", "depths": ["enc1"], "subspaces": 2}]})
    assert "sharing.0.subspaces" in msg and "unknown key" in msg


def test_mixes_activations_follows_the_mechanisms():
    assert validate_config({**SMALL, "sharing": [{"kind": "sluice", "depths": ["enc1"]}]}).mixes_activations
    assert not validate_config({**SMALL, "sharing": [{"kind": "soft", "depths": {"enc1": 1.0}}]}).mixes_activations


def test_planned_patch_size_still_gets_the_shape_checks():
    ok = validate_config({"preprocess": {"patch_size": None}, "sharing": [{"kind": "sluice", "depths": ["enc1"]}]})
    assert ok.preprocess.patch_size is None
    msg = _err({**SMALL, "preprocess": {"patch_size": None}, "sharing": [{"kind": "sluice", "depths": ["enc1"], "beta_depths": {"enc1": 1.0}}]})
    assert "sharing.0.beta_depths" in msg and "1/2 resolution" in msg
