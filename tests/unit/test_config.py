"""Config: presets, dotted overrides, strict keys and types, cross-field checks."""

from __future__ import annotations

import pytest
import yaml

from rsmoe.config import (
    ConfigError,
    dump_config,
    from_dict,
    load_config,
    resolve_preset,
)


def test_defaults_preset_and_override_precedence(tmp_path):
    args = load_config("tiny", ["optim.lr=0.5", "model.experts=[theme, objects]", "train.steps=3"])
    assert args.optim.lr == 0.5  # CLI beats the preset's 1e-3
    assert args.model.experts == ["theme", "objects"]
    assert args.model.llm.hidden_size == 64  # from the preset
    assert args.model.qformer.cross_attention_frequency == 2  # dataclass default


def test_int_is_accepted_for_float_and_yaml_scalars():
    args = load_config("tiny", ["optim.lr=1", "train.precision=fp32"])
    assert isinstance(args.optim.lr, float) and args.optim.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1e-4", "unknown config key 'optim.lrr'"),
        ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
        ("train.steps=ten", "config key 'train.steps': expected int"),
        ("model.experts=theme", "config key 'model.experts': expected a list"),
        ("model.lora.r=2.5", "config key 'model.lora.r': expected int"),
        ("optim=3", "config key 'optim' is a section"),
        ("train.precision=fp16", "config key 'train.precision'"),
        ("stage=3", "config key 'stage'"),
        ("lr", "not of the form section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", [override])


def test_ep_must_divide_experts():
    with pytest.raises(ConfigError, match="3 experts cannot be split over ep=2"):
        load_config("tiny", ["stage=2", "distributed.ep=2"])
    assert load_config("tiny", ["stage=2", "distributed.ep=3"]).distributed.ep == 3


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"preset 'nope' not found.*'demo'.*'tiny'"):
        load_config("nope")


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_config(str(bad))


def test_stage_overrides_apply_only_to_their_stage_and_cli_still_wins(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"optim": {"lr": 0.1}, "stage_overrides": {"2": {"optim.lr": 0.2, "train.steps": 7}}}))
    assert load_config(str(preset), ["stage=1"]).optim.lr == 0.1
    s2 = load_config(str(preset), ["stage=2"])
    assert (s2.optim.lr, s2.train.steps) == (0.2, 7)
    assert load_config(str(preset), ["stage=2", "optim.lr=0.3"]).optim.lr == 0.3


def test_dump_and_reload_round_trip(tmp_path):
    args = load_config("tiny", ["optim.lr=0.25"])
    dump_config(args, tmp_path / "config.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == args


@pytest.mark.parametrize("name", ["tiny", "demo", "rsmoe-1b", "rsmoe-7b"])
def test_every_shipped_preset_parses(name):
    assert resolve_preset(name).exists()
    load_config(name)
