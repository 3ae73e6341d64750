"""Inputs are checked before anything expensive starts; command lines take flags among overrides;
evaluation and fine-tuning refuse a model section other than the checkpoint's run."""
import time

import pytest
import yaml
from train_fixtures import write_train_data

from pipeline.train import checkpoint, preflight
from pipeline import evaluate, finetune, pretrain
from pipeline.config import ConfigError, dump_config, load_config, model_differences, to_dict


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return write_train_data(tmp_path_factory.mktemp("preflight"))


def _fails_fast(argv, *needles, seconds=10.0):
    """pretrain.main(argv) raises before any process group, naming every needle, within `seconds`."""
    import torch.distributed as dist

    t = time.perf_counter()
    with pytest.raises(Exception) as err:
        pretrain.main(argv)
    assert time.perf_counter() - t < seconds
    assert not dist.is_initialized()
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    return err.value


def test_a_wrong_tokenizer_path_fails_before_start_up_naming_it(config, tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    _fails_fast(["--config", str(config), f"data.tokenizer={missing}"], "data.tokenizer", str(missing),
                "no such file or directory")


def test_a_hub_name_without_hub_access_says_so(config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails_fast(["--config", str(config), "data.tokenizer=no-such-org/no-such-tokenizer"],
                "not found locally", "no hub access")
    assert not preflight.hub_reachable()


def test_missing_pretrained_weights_and_eval_set_fail_before_start_up(config, tmp_path):
    _fails_fast(["--config", str(config), f"model.vision.pretrained={tmp_path}/vit.pth"],
                "model.vision.pretrained", "no such file")
    _fails_fast(["--config", str(config), f"eval.data={tmp_path}/eval_{{00000..00001}}.tar", "train.eval_every=4"],
                "eval.data", "2 file(s) do not exist", f"{tmp_path}/eval_00000.tar")


def test_a_tokenizer_larger_than_the_embedding_table_fails_before_start_up(config):
    _fails_fast(["--config", str(config), "model.text.vocab_size=100"], "vocab_size")


def test_flags_may_sit_among_the_overrides():
    args = pretrain.parse_args(["--config", "tiny", "train.steps=5", "--resume", "auto", "train.lr=1.0"])
    assert (args.config, args.resume, args.overrides) == ("tiny", "auto", ["train.steps=5", "train.lr=1.0"])
    args = finetune.parse_args(["train.steps=5", "--task", "vqa", "--config", "tiny", "--init", "run",
                                "data.batch_size=2"])
    assert (args.task, args.init, args.overrides) == ("vqa", "run", ["train.steps=5", "data.batch_size=2"])


def test_model_differences_names_each_key_and_skips_training_only_ones():
    a = to_dict(load_config("tiny"))["model"]
    b = to_dict(load_config("tiny", ["model.fusion.heads=4", "model.text.dropout=0.3",
                                     "model.vision.pretrained=x.pth"]))["model"]
    assert model_differences(a, b) == ["model.fusion.heads: checkpoint 2, this config 4"]
    assert model_differences(a, a) == []


def test_evaluation_refuses_a_config_of_another_geometry(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    dump_config(load_config("tiny"), run / "config.yaml")
    other = load_config("tiny", ["model.fusion.heads=4", "model.vision.heads=4"])
    with pytest.raises(ConfigError) as err:
        evaluate.load_model(str(run), other, "cpu")
    assert "model.fusion.heads: checkpoint 2, this config 4" in str(err.value)
    assert "model.vision.heads" in str(err.value)
    # an fp32 file: the config written beside it by `python -m pipeline.train.checkpoint`
    fp32 = tmp_path / "model_fp32.pt"
    fp32.write_bytes(b"")
    (tmp_path / "model_fp32.yaml").write_text(yaml.safe_dump(to_dict(load_config("tiny"))))
    with pytest.raises(ConfigError, match="model.vision.heads"):
        checkpoint.check_model_section(fp32, other)
    checkpoint.check_model_section(fp32, load_config("tiny", ["model.text.dropout=0.0"]))  # same geometry
    # fine-tuning may change the image size (positions are resampled), nothing else
    bigger = load_config("tiny", ["model.vision.image_size=64"])
    checkpoint.check_model_section(run, bigger, allowed=("model.vision.image_size",))
    with pytest.raises(ConfigError, match="model.vision.image_size"):
        checkpoint.check_model_section(run, bigger)
