"""Trainer pieces in one process: DeepSpeed config fill-in, parameter groups, LR schedule,
non-finite guard, checkpoint bookkeeping, fp32 loading, metrics, entry-point errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.train import checkpoint, engine, monitor
from pipeline import pretrain
from pipeline.config import ConfigError, load_config
from pipeline.model import build_model


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", ["train.grad_accum=3", "train.grad_clip=0.5", "data.batch_size=6"])


# ---------------------------------------------------------------- DeepSpeed config
@pytest.mark.parametrize("path", sorted(engine.DS_CONFIG_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_ds_config_is_filled_from_the_training_config(path, cfg):
    stage, *rest = path.stem.split("_")
    overrides = [f"train.zero_stage={stage[4:]}", f"train.precision={rest[-1]}",
                 f"train.offload_optimizer={'offload' in rest}", f"train.ds_config={path.name}"]
    c = load_config("tiny", ["train.grad_accum=3", "train.grad_clip=0.5", "data.batch_size=6", *overrides])
    ds = engine.ds_config_for(c, world_size=4)
    assert "auto" not in json.dumps(ds)
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (6, 3, 72)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == int(stage[4:])
    assert ds["bf16"]["enabled"] == (rest[-1] == "bf16")
    assert ds.get("fp16", {}).get("enabled", False) == (rest[-1] == "fp16")
    assert ds["optimizer"]["params"]["lr"] == c.train.lr and ds["optimizer"]["params"]["betas"] == list(c.train.betas)


def test_default_ds_config_follows_stage_precision_and_offload():
    c = load_config("tiny", ["train.zero_stage=3", "train.precision=fp16"])
    assert engine.default_ds_config(c).name == "zero3_fp16.json"
    c = load_config("tiny", ["train.zero_stage=2", "train.offload_optimizer=true"])
    assert engine.default_ds_config(c).name == "zero2_offload_bf16.json"


def test_ds_config_mismatch_names_both_values(cfg):
    template = engine.load_ds_config(cfg)
    template["train_micro_batch_size_per_gpu"] = 16
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=16 .* gives 6 \(data.batch_size\)"):
        engine.fill_ds_config(template, cfg, world_size=2)
    template = engine.load_ds_config(cfg)
    template["train_batch_size"] = 36
    with pytest.raises(ConfigError, match=r"train_batch_size=36 .* gives 72 \(data.batch_size x accumulation steps "
                                          r"x world size = 6 x 3 x 4\)"):
        engine.fill_ds_config(template, cfg, world_size=4)
    c = load_config("tiny", ["train.zero_stage=2", "train.ds_config=zero3_bf16.json"])
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=3 .* gives 2 \(train.zero_stage\)"):
        engine.ds_config_for(c, world_size=1)
    c = load_config("tiny", ["train.ds_config=zero2_offload_bf16.json"])
    with pytest.raises(ConfigError, match="offload_optimizer.device='cpu' but train.offload_optimizer=false"):
        engine.ds_config_for(c, world_size=1)
    with pytest.raises(ConfigError, match="'scheduler' section"):
        engine.fill_ds_config(dict(engine.load_ds_config(cfg), scheduler={"type": "WarmupLR"}), cfg, 1)
    with pytest.raises(ConfigError, match="not found .* files in"):
        engine.ds_config_for(load_config("tiny", ["train.ds_config=nope.json"]), 1)


# ---------------------------------------------------------------- parameter groups and LR
def test_param_groups_decay_and_head_multiplier():
    c = load_config("tiny", ["train.head_lr_mult=5.0", "train.lr=1.0e-4", "train.weight_decay=0.05"])
    model = build_model(c)
    groups = {g["name"]: g for g in engine.param_groups(model, c.train)}
    where = {id(p): name for name, g in groups.items() for p in g["params"]}
    params = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups.values()) == len(params) == len(where)
    no_decay = ["itc_temp", "vision.cls_token", "vision.pos_embed", "vision.temporal_embed",
                "vision.blocks.0.norm1.weight", "vision.blocks.0.attn.qkv.bias",
                "text.roberta.embeddings.word_embeddings.weight", "text.roberta.embeddings.position_embeddings.weight",
                "text.roberta.embeddings.token_type_embeddings.weight", "text.roberta.embeddings.LayerNorm.weight"]
    for name in no_decay:
        assert where[id(params[name])] == "backbone_no_decay", name
    assert where[id(params["fusion.token_type.weight"])] == "head_no_decay"
    assert where[id(params["fusion.text_layers.0.norm1.bias"])] == "head_no_decay"
    for name in ("vision.blocks.0.attn.qkv.weight", "vision.patch_embed.proj.weight",
                 "text.roberta.encoder.layer.0.attention.self.query.weight", "text_proj.net.0.weight"):
        assert where[id(params[name])] == "backbone_decay", name
    for name in ("fusion.text_layers.0.self_attn.q.weight", "itm_head.weight", "mlm_head.decoder.weight",
                 "vision_pooler.dense.weight"):
        assert where[id(params[name])] == "head_decay", name
    assert groups["backbone_decay"]["lr"] == pytest.approx(1e-4) and groups["head_decay"]["lr"] == pytest.approx(5e-4)
    assert groups["backbone_decay"]["weight_decay"] == 0.05 and groups["head_no_decay"]["weight_decay"] == 0.0


def test_lr_schedule_warmup_then_linear_or_cosine():
    tc = load_config("tiny", ["train.warmup_steps=10", "train.steps=110", "train.min_lr_ratio=0.1"]).train
    assert [engine.lr_factor(s, tc) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert engine.lr_factor(10, tc) == pytest.approx(1.0)
    assert engine.lr_factor(60, tc) == pytest.approx(0.1 + 0.9 * 0.5)
    assert engine.lr_factor(110, tc) == pytest.approx(0.1) and engine.lr_factor(500, tc) == pytest.approx(0.1)
    tc.decay = "cosine"
    assert engine.lr_factor(35, tc) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert engine.lr_factor(110, tc) == pytest.approx(0.1)


# ---------------------------------------------------------------- non-finite guard
class _FakeEngine:
    def __init__(self, loss):
        self.loss, self.calls = loss, []

    def __call__(self, batch):
        return {"loss": torch.tensor(self.loss, requires_grad=True), "itc": torch.tensor(1.0)}

    def backward(self, loss):
        self.calls.append("backward")

    def step(self):
        self.calls.append("step")


def test_nonfinite_loss_skips_backward_and_step():
    for bad in (float("nan"), float("inf")):
        e = _FakeEngine(bad)
        assert not engine.train_micro_step(e, {}).applied and e.calls == []
    e = _FakeEngine(2.0)
    result = engine.train_micro_step(e, {})
    assert result.applied and e.calls == ["backward", "step"] and float(result.losses["loss"]) == 2.0


def test_nonfinite_guard_counts_drops_in_a_row(tmp_path):
    from pipeline.train.trainer import NonFiniteGuard, NonFiniteLoss

    guard = NonFiniteGuard(limit=2, out=tmp_path, total=5)
    assert guard.dropped("batch") == "non-finite loss, batch skipped (1 in a row, 6 in total)"
    guard.check(3)
    assert guard.passed() is None and guard.in_a_row == 0
    guard.dropped("batch"), guard.dropped("batch")
    with pytest.raises(NonFiniteLoss, match="2 non-finite losses in a row at step 9"):
        guard.check(9)
    assert guard.passed(partial=2).startswith("non-finite ITM/MLM/MVM loss in 2") and guard.total == 10


def test_to_device_casts_floats_only():
    batch = {"pixels": torch.zeros(2, 1, 3, 4, 4), "text_ids": torch.ones(2, 3, dtype=torch.long), "source": "x"}
    out = engine.to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert out["pixels"].dtype == torch.bfloat16 and out["text_ids"].dtype == torch.long and out["source"] == "x"


# ---------------------------------------------------------------- checkpoints
def _fake_tag(root, step, complete=True):
    d = root / "checkpoints" / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    if complete:
        (d / checkpoint.COMPLETE).write_text("{}")
    return d


def _timed_tag(root, step, at):
    d = _fake_tag(root, step)
    (d / checkpoint.COMPLETE).write_text(json.dumps({"step": step, "time": at}))
    return d


def test_a_kill_before_latest_is_renamed_resumes_from_the_tag_just_completed(tmp_path):
    _timed_tag(tmp_path, 2, 100.0)
    four = _timed_tag(tmp_path, 4, 200.0)
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_text("step_00000002")  # killed before the rename
    assert checkpoint.resolve(tmp_path, "auto") == four


def test_after_a_resume_from_an_older_tag_the_new_branch_wins(tmp_path):
    _timed_tag(tmp_path, 2, 100.0)
    _timed_tag(tmp_path, 6, 300.0)  # the branch abandoned by train.resume=<step_2>
    four = _timed_tag(tmp_path, 4, 400.0)
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_text("step_00000004")
    assert checkpoint.resolve(tmp_path, "auto") == four


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    assert checkpoint.resolve(tmp_path, "auto") is None and checkpoint.resolve(tmp_path, "none") is None
    _fake_tag(tmp_path, 100)
    good = _fake_tag(tmp_path, 200)
    _fake_tag(tmp_path, 300, complete=False)  # a save killed midway
    assert checkpoint.find_latest(tmp_path) == good
    (tmp_path / "checkpoints" / "latest").write_text("step_00000300")  # even if latest named it
    assert checkpoint.resolve(tmp_path, "auto") == good
    checkpoint.prune(tmp_path / "checkpoints", keep_last=1)
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000200"]


def test_missing_or_partial_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        checkpoint.resolve(tmp_path, str(tmp_path / "checkpoints" / "step_00000042"))
    partial = _fake_tag(tmp_path, 7, complete=False)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve(tmp_path, str(partial))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.consolidate(tmp_path / "elsewhere", tmp_path / "x.pt")


def test_entry_point_rejects_bad_resume_and_ds_config_before_starting(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        pretrain.main(["--config", "tiny", "--resume", str(tmp_path / "missing"), f"train.output_dir={tmp_path}"])
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=8 .* gives 4 \(data.batch_size\)"):
        pretrain.main(["--config", "tiny", "data.batch_size=4", f"train.ds_config={tmp_path / 'ds.json'}"])


def test_parse_args_accepts_the_deepspeed_launcher_flag():
    args = pretrain.parse_args(["--local_rank=1", "--config", "tiny", "--resume", "auto", "train.steps=5"])
    assert (args.config, args.resume, args.overrides) == ("tiny", "auto", ["train.steps=5"])


def test_load_fp32_round_trip(tmp_path):
    c = load_config("tiny")
    torch.manual_seed(0)
    trained = build_model(c)
    with torch.no_grad():
        trained.itc_temp.fill_(0.05)
    torch.save(trained.state_dict(), tmp_path / "fp32.pt")
    fresh = checkpoint.load_fp32(build_model(c), tmp_path / "fp32.pt")
    assert fresh.temperature().item() == pytest.approx(0.05)
    assert torch.equal(fresh.vision.blocks[0].attn.qkv.weight, trained.vision.blocks[0].attn.qkv.weight)


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    a = (torch.rand(3), torch.randint(10, (3,)))
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), torch.randint(10, (3,)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- metrics
def test_window_and_console_line():
    w = monitor.Window(torch.device("cpu"))
    for loss in (2.0, 4.0):
        w.add_batch(samples=8, tokens=100)
        w.add_losses({"loss": torch.tensor(loss), "itc": torch.tensor(loss / 2), "itc_temperature": torch.tensor(0.07)})
        w.add_step(data_s=0.1, compute_s=0.3)
    m = w.reduce()
    assert m["loss/total"] == pytest.approx(3.0) and m["loss/itc"] == pytest.approx(1.5)
    assert m["temperature/itc"] == pytest.approx(0.07)
    assert m["time/data_wait_s"] == pytest.approx(0.1) and m["time/compute_s"] == pytest.approx(0.3)
    assert m["throughput/tokens_per_s"] == pytest.approx(m["throughput/samples_per_s"] * 200 / 16)
    m.update({"lr/backbone_decay": 1e-4, "lr/head_decay": 5e-4, "train/grad_norm": 1.5, "train/nonfinite_skipped": 2})
    line = monitor.console_line(10, 100, m)
    assert line.startswith("step 10/100 | loss 3.0000 (itc 1.500)") and "lr 5.00e-04" in line
    assert "gnorm 1.500" in line and "data 25%" in line and "nonfinite skipped 2" in line


def test_batch_tokens_counts_text_and_vision():
    batch = {"pixels": torch.zeros(2, 4, 3, 32, 32), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    assert monitor.batch_tokens(batch, patch_size=8) == 5 + 2 * 4 * (1 + 16)


def test_eval_hook_only_with_eval_data():
    assert pretrain._eval_hook(load_config("tiny", ["train.eval_every=10"])) is None
    from pipeline import zeroshot

    hook = pretrain._eval_hook(load_config("tiny", ["train.eval_every=10", "eval.data=x.tar"]))
    assert hook is zeroshot.evaluate_during_training
