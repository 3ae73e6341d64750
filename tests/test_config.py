"""The typed config: YAML + inherit, dotted overrides, clear errors for wrong keys and values."""
import pytest

from pipeline.config import ConfigError, dump_config, load_config


def test_tiny_inherits_base_and_overrides_apply():
    cfg = load_config("tiny", ["model.fusion.layers=3", "train.lr=1e-4", "loss.itm_negatives=hard",
                               "train.betas=[0.9, 0.95]"])
    assert cfg.model.vision.width == 64
    assert cfg.model.fusion.layers == 3 and cfg.train.lr == 1e-4 and cfg.train.betas == (0.9, 0.95)
    assert cfg.loss.itm_negatives == "hard" and cfg.loss.itc == 0.5
    base = load_config("base")
    assert (base.model.vision.depth, base.model.vision.image_size, base.model.fusion.layers) == (11, 288, 6)


@pytest.mark.parametrize("override,message", [
    ("model.fusion.layer=2", "unknown config key 'model.fusion.layer'"),
    ("trian.lr=1", "unknown config key 'trian'"),
    ("model.fusion.layers=two", "model.fusion.layers: expected int"),
    ("loss.schedule=fast", "loss.schedule='fast' must be one of"),
    ("data.num_frames=9", "data.num_frames=9 must be in 1..model.vision.max_frames=8"),
    ("train.lr", "must look like section.key=value"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("tiny", [override])


def test_unknown_key_in_a_yaml_file_and_missing_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inherit: tiny\ndata:\n  sources:\n    - {name: a, shards: x.tar, modalty: image}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data.sources\[0\].modalty'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config 'nope' not found"):
        load_config("nope")


def test_dumped_config_loads_back_identically(tmp_path):
    cfg = load_config("tiny", ["data.sources=[{name: a, shards: 'x/{00000..00003}.tar', weight: 2}]"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
