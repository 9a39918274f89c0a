"""Configuration: schema validation, overrides and the messages users see."""

from pathlib import Path

import pytest
import yaml

from medmtl.cli import main
from medmtl.config import ConfigError, apply_overrides, config_to_yaml, flatten_config, load_config, validate_config
from medmtl.models.two_column import TwoColumnNet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "tests" / "configs" / "tiny.yaml"]


def _write(tmp_path, data) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    p = _write(tmp_path, {"train": {"stepz": 10}})
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "train.stepz" in msg and "unknown key" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    p = _write(tmp_path, {"train": {"lr": "fast"}})
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "train.lr" in str(err.value) and "'fast'" in str(err.value)


def test_bad_value_in_union_member_names_list_index(tmp_path):
    p = _write(tmp_path, {"sharing": [{"kind": "soft", "depths": {"enc0": -1.0}}]})
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "sharing.0.depths" in str(err.value) and ">= 0" in str(err.value)


def test_unknown_depth_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        validate_config({"sharing": [{"kind": "cross_stitch", "depths": ["enc7"]}]})
    msg = str(err.value)
    assert "sharing.0.depths" in msg and "'enc7'" in msg and "bottleneck" in msg


def test_unknown_mechanism_kind_is_rejected():
    with pytest.raises(ConfigError) as err:
        validate_config({"sharing": [{"kind": "telepathy", "depths": ["enc0"]}]})
    assert "sharing.0" in str(err.value) and "telepathy" in str(err.value)


def test_gradnorm_depth_must_exist():
    with pytest.raises(ConfigError) as err:
        validate_config({"weighting": {"method": "gradnorm", "depth": "enc9"}})
    assert "weighting.depth" in str(err.value)


def test_depth_claimed_by_two_parameter_sharing_mechanisms_is_rejected():
    with pytest.raises(ConfigError) as err:
        validate_config({"sharing": [{"kind": "hard", "depths": ["enc0"]}, {"kind": "shared_kernels", "depths": ["enc0"]}]})
    assert "already shared" in str(err.value)


def test_overrides_apply_nested_list_and_typed_values(tmp_path):
    p = _write(tmp_path, {"sharing": [{"kind": "soft", "depths": {"enc0": 0.1}}]})
    cfg = load_config(p, ["train.steps=7", "sharing.0.depths.enc1=0.5", "preprocess.patch_size=[16,16,16]", "tracking.tracking_uri=null"])
    assert cfg.train.steps == 7
    assert cfg.sharing[0].depths == {"enc0": 0.1, "enc1": 0.5}
    assert cfg.preprocess.patch_size == (16, 16, 16)
    assert cfg.tracking.tracking_uri is None


@pytest.mark.parametrize("bad, expect", [
    ("train.steps", "expected key.sub=value"),
    ("train.steps.x=3", "is a value, not a section"),
    ("sharing.5.kind=soft", "not an index"),
])
def test_bad_override_messages(bad, expect):
    with pytest.raises(ConfigError) as err:
        apply_overrides({"train": {"steps": 3}, "sharing": []}, [bad])
    assert expect in str(err.value) and bad.split("=")[0] in str(err.value)


def test_override_with_bad_value_fails_before_work(tmp_path):
    p = _write(tmp_path, {})
    with pytest.raises(ConfigError) as err:
        load_config(p, ["train.precision=fp8"])
    assert "train.precision" in str(err.value) and "with overrides train.precision=fp8" in str(err.value)


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips_and_flattens():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    again = validate_config(yaml.safe_load(config_to_yaml(cfg)))
    assert again == cfg
    flat = flatten_config(cfg)
    assert flat["train.steps"] == str(cfg.train.steps)
    assert flat["data.labels.ct.1"] == "liver"
    assert flat["sharing.0.kind"] == "soft"


def test_every_field_has_a_description():
    from pydantic import BaseModel

    from medmtl import config as c

    missing = []
    for name in dir(c):
        cls = getattr(c, name)
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == c.__name__:
            for fname, f in cls.model_fields.items():
                if fname not in ("kind", "method") and not f.description and not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)):
                    missing.append(f"{name}.{fname}")
    assert missing == [], f"fields without one-line help: {missing}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_builds(path):
    cfg = load_config(path)
    net = TwoColumnNet(cfg=cfg)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_cli_config_show_prints_resolved_yaml_and_errors_cleanly(capsys):
    assert main(["config", "show", str(ROOT / "configs" / "demo.yaml"), "train.steps=11"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["steps"] == 11 and "weighting" in shown and shown["model"]["channels"]
    assert main(["config", "show", str(ROOT / "configs" / "demo.yaml"), "model.chanels=[4,8]"]) == 2
    err = capsys.readouterr().err
    assert "model.chanels" in err and "unknown key" in err and "Traceback" not in err


def test_comparison_configs_differ_only_in_sharing_and_match_the_demo_but_for_weighting():
    # the comment at the top of each abdomen_*/baseline_* config claims exactly this
    root = Path(__file__).resolve().parents[1] / "configs"
    demo = load_config(root / "demo.yaml")
    paths = sorted(p for p in root.glob("abdomen_*.yaml") if not p.name.startswith("abdomen_hard_"))
    studied = [load_config(p) for p in paths + sorted(root.glob("baseline_*.yaml"))]
    first = studied[0].model_dump(exclude={"name", "sharing"})
    for cfg in studied:
        assert cfg.model_dump(exclude={"name", "sharing"}) == first, cfg.name
        assert cfg.weighting.method == "equal"
        for section in ("data", "preprocess", "model", "loss", "train", "eval"):
            assert getattr(cfg, section) == getattr(demo, section), (cfg.name, section)


def test_weighting_variants_differ_from_baseline_hard_only_in_weighting():
    # abdomen_hard_<method>.yaml: the claim at their top; the study runs them as weighting variants
    root = Path(__file__).resolve().parents[1] / "configs"
    base = load_config(root / "baseline_hard.yaml").model_dump(exclude={"name", "weighting"})
    variants = sorted(root.glob("abdomen_hard_*.yaml"))
    assert {p.stem.removeprefix("abdomen_hard_") for p in variants} >= {"metabalance", "pcgrad", "cagrad"}
    for p in variants:
        cfg = load_config(p)
        assert cfg.name == p.stem and cfg.weighting.method == p.stem.removeprefix("abdomen_hard_")
        assert cfg.model_dump(exclude={"name", "weighting"}) == base, p.name


def test_loss_section_defaults_are_the_trainers_former_dice_ce():
    loss = validate_config({}).loss
    assert (loss.kind, loss.include_background, loss.smooth_nr, loss.smooth_dr) == ("dice_ce", False, 1e-5, 1e-5)
    assert (loss.squared_pred, loss.batch, loss.lambda_dice, loss.lambda_ce) == (False, False, 1.0, 1.0)
