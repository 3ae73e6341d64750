"""The typed config: YAML + inherit, dotted overrides, clear errors for wrong keys and values."""
import pytest

from pathlib import Path

from pipeline.config import ConfigError, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------- loss presets
def test_each_preset_sets_its_weights_and_keys_beside_it_win():
    from pipeline.config import LOSS_PRESETS, LossConfig

    for name, weights in LOSS_PRESETS.items():
        loss = load_config("tiny", [f"loss.preset={name}"]).loss
        assert {k: getattr(loss, k) for k in weights} == weights, name
    assert LOSS_PRESETS["released"] == dict(itc=0.0625, itm=1.0, mlm=1.0, scl_vision=0.125, scl_text=0.125,
                                            itm_pairs="swap")  # 0.5 / 8 and 1 / 8: the released code on 8 GPUs
    assert LOSS_PRESETS["released_literal"]["scl_vision"] == 0
    # the dataclass defaults are their default preset's values
    assert {k: getattr(LossConfig(), k) for k in LOSS_PRESETS[LossConfig().preset]} == LOSS_PRESETS[LossConfig().preset]
    # a key beside the preset (or later) wins; a preset named later resets what came before it
    assert load_config("tiny", ["loss.preset=paper", "loss.scl_text=0.3"]).loss.scl_text == 0.3
    assert load_config("finetune_retrieval", ["loss.preset=paper"]).loss.scl_vision == 1.0
    # base trains the released code's effective weights (docs/model.md); tiny keeps the default
    base, tiny = load_config("base").loss, load_config("tiny").loss
    assert {k: getattr(base, k) for k in LOSS_PRESETS["released"]} == LOSS_PRESETS["released"]
    assert (base.preset, tiny.preset) == ("released", LossConfig().preset)
    assert load_config("finetune_retrieval").loss.scl_vision == 0.0
    with pytest.raises(ConfigError, match="loss.preset='nope' must be one of"):
        load_config("tiny", ["loss.preset=nope"])


def test_a_dumped_config_with_a_preset_loads_back_identically(tmp_path):
    cfg = load_config("tiny", ["loss.preset=released", "loss.itc=0.25"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg and cfg.loss.itc == 0.25 and cfg.loss.scl_text == 0.125


# ---------------------------------------------------------------- the global batch
@pytest.mark.parametrize("world,accum", [(1, 16), (2, 8), (4, 4)])
def test_the_global_batch_derives_the_accumulation_at_every_world_size(world, accum):
    from pipeline.config import accumulation, batch_line
    from pipeline.train.engine import fill_ds_config, load_ds_config

    cfg = load_config("tiny", ["train.global_batch=128", "data.batch_size=8"])
    assert accumulation(cfg, world) == accum
    ds = fill_ds_config(load_ds_config(cfg), cfg, world)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) == \
        (128, accum, 8)
    assert batch_line(cfg, world) == f"global batch 128 = 8 per rank x {world} ranks x {accum} accumulation steps"


def test_a_global_batch_that_does_not_divide_names_the_three_numbers():
    from pipeline.config import accumulation

    cfg = load_config("tiny", ["train.global_batch=100", "data.batch_size=8"])
    with pytest.raises(ConfigError, match=r"train.global_batch=100 is not a multiple of data.batch_size=8 x 4 ranks"):
        accumulation(cfg, 4)
    with pytest.raises(ConfigError, match="both set"):
        load_config("tiny", ["train.global_batch=64", "train.grad_accum=2"])
    base = load_config("base")
    assert (base.train.global_batch, base.data.batch_size, accumulation(base, 64)) == (4096, 16, 4)
    assert accumulation(load_config("tiny", ["train.grad_accum=3"]), 2) == 3  # global_batch 0: grad_accum as given


def test_print_config_writes_the_resolved_config_and_starts_nothing(tmp_path):
    import subprocess
    import sys

    import yaml

    for script, config in (("pipeline/pretrain.py", "base"), ("pipeline/finetune.py", "finetune_coco")):
        out = subprocess.run([sys.executable, script, "--config", config, "--print-config", "train.steps=7",
                              f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120,
                             cwd=str(REPO))
        assert out.returncode == 0, out.stderr
        printed = tmp_path / f"{config}.yaml"
        printed.write_text(out.stdout)
        want = load_config(config, ["train.steps=7", f"train.output_dir={tmp_path / 'run'}"])
        assert load_config(printed) == want and yaml.safe_load(out.stdout)["train"]["steps"] == 7
    assert not (tmp_path / "run").exists()
