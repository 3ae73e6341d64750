"""Contrastive accumulation (pipeline/train/gradcache.py): with `train.grad_accum = 2` and
`train.contrastive_accum`, the losses and the gradients equal one step on the doubled batch.

In process (one rank): the model's gradients, images and videos, dropout replayed exactly.
Under torchrun (2 ranks, gloo, real DeepSpeed engines with an SGD step at lr 1, so the update is
the gradient DeepSpeed applied): ZeRO-0 on images and ZeRO-2 on 2-frame videos, ITC and both SCL
terms; then the trainer itself (bf16, ZeRO-2, dropout on) runs a few cached steps.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import run_driver

REPO = Path(__file__).resolve().parents[1]
CONTRASTIVE_ONLY = ["loss.itm=0", "loss.mlm=0", "model.fusion.dropout=0", "model.text.dropout=0"]


def _cfg(*overrides):
    from pipeline.config import load_config

    return load_config("tiny", list(overrides))


def _batches(cfg, frames=1, b=4, seeds=(1, 2)):
    from pipeline.concepts import synthetic_batch

    parts = [synthetic_batch(cfg, b, frames=frames, seed=s) for s in seeds]
    return parts, {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("frames", [1, 3])
def test_cached_gradients_equal_the_doubled_batch_in_process(frames):
    from pipeline.train import gradcache
    from pipeline.model import build_model

    cfg = _cfg(*CONTRASTIVE_ONLY)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    parts, both = _batches(cfg, frames)
    out = model(both)
    out["loss"].backward()
    reference = _grads(model)

    model.zero_grad()
    result = gradcache.accumulate(lambda b, **kw: model(b, **kw), lambda loss: (loss / 2).backward(), parts,
                                  cfg.loss)
    cached = _grads(model)
    model.zero_grad()
    for p in parts:  # plain accumulation: each half sees only its own rows as negatives
        (model(p)["loss"] / 2).backward()
    plain = _grads(model)

    for k in ("itc", "scl_vision", "scl_text", "loss"):
        assert float(result.losses[k]) == pytest.approx(out[k].item(), rel=1e-6), k
    assert _rel(cached, reference) < 1e-5
    assert _rel(plain, reference) > 0.05  # the comparison can tell the two apart
    assert model.itc_temp.grad is not None and float(result.losses["cache_drift"]) == 0.0


def test_second_pass_replays_dropout_and_keeps_the_per_sample_losses():
    """Dropout on, ITM and MLM on: the second pass sees the first pass's features exactly (drift 0),
    and ITM/MLM are the micro-batches' own losses."""
    from pipeline.train import gradcache
    from pipeline.model import build_model

    cfg = _cfg("model.fusion.dropout=0.3", "model.text.dropout=0.3", "model.vision.drop_path=0.2")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    parts, _ = _batches(cfg, frames=2)
    result = gradcache.accumulate(lambda b, **kw: model(b, **kw), lambda loss: loss.backward(), parts, cfg.loss)
    assert result.applied and result.partial == 0
    assert float(result.losses["cache_drift"]) == 0.0
    assert {"itc", "itm", "mlm", "scl_vision", "scl_text", "loss"} <= set(result.losses)
    # without the replay, dropout draws other masks and the features move
    torch.manual_seed(5)
    with torch.no_grad():
        a = model(parts[0], features_only=True)["scl_text_q"]
        b = model(parts[0], features_only=True)["scl_text_q"]
    assert (a - b).abs().max() > 1e-3


def test_images_and_videos_in_one_step_group_scl_vision_by_frame_count():
    from pipeline import objectives as obj
    from pipeline.model import build_model

    cfg = _cfg(*CONTRASTIVE_ONLY)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    imgs, _ = _batches(cfg, frames=1, seeds=(1, 2))
    vids, _ = _batches(cfg, frames=2, b=2, seeds=(3,))
    with torch.no_grad():
        feats = [model(b, features_only=True) for b in (*imgs, *vids)]
        mixed = obj.contrastive_terms(feats, cfg.loss, cfg.loss.scl_temperature)
        only_imgs = obj.contrastive_terms(feats[:2], cfg.loss, cfg.loss.scl_temperature)
        only_vids = obj.contrastive_terms(feats[2:], cfg.loss, cfg.loss.scl_temperature)
    # 8 image rows and 2 video rows: each group's loss over its own rows, weighted by rows
    want = (8 * only_imgs["scl_vision"] + 2 * only_vids["scl_vision"]) / 10
    assert float(mixed["scl_vision"]) == pytest.approx(float(want), rel=1e-6)
    # ITC and SCL text compare global vectors: all 10 rows are negatives of each other
    assert float(mixed["itc"]) > float(only_vids["itc"])


def test_non_finite_contrastive_loss_drops_the_whole_group():
    from pipeline.train import gradcache
    from pipeline.model import build_model

    cfg = _cfg(*CONTRASTIVE_ONLY)
    model = build_model(cfg).train()
    parts, _ = _batches(cfg)
    parts[1]["pixels"][0] = float("nan")
    calls = []
    result = gradcache.accumulate(lambda b, **kw: model(b, **kw), calls.append, parts, cfg.loss)
    assert not result.applied and result.losses == {} and calls == []  # no backward at all


def test_config_checks():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="loss.schedule=fused"):
        _cfg("train.contrastive_accum=true", "loss.schedule=naive")
    with pytest.raises(ConfigError, match="all 0"):
        _cfg("train.contrastive_accum=true", "loss.itc=0", "loss.scl_vision=0", "loss.scl_text=0")


# ---------------------------------------------------------------- 2 ranks, real DeepSpeed engines
@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    from train_fixtures import finish, torchrun, write_train_data

    root = tmp_path_factory.mktemp("gradcache")
    config = write_train_data(root)
    proc = torchrun([Path(__file__), "--config", config, "--out", root], root / "run.log")
    finish(proc, root / "run.log", timeout=600)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero0_images", "zero2_videos"])
def test_two_ranks_cached_step_equals_one_step_on_the_doubled_batch(distributed_run, case):
    report = json.loads((distributed_run / f"{case}.json").read_text())
    for rank in report:  # every rank's own loss terms (its rows against the gathered columns)
        for k in ("itc", "scl_vision", "scl_text"):
            assert rank["cached"][k] == pytest.approx(rank["doubled"][k], rel=1e-5), k
            assert rank["plain"][k] != pytest.approx(rank["doubled"][k], rel=1e-2), k
        # the update DeepSpeed applied (SGD, lr 1): cached == doubled batch; plain accumulation differs
        assert rank["cached_vs_doubled"] < 1e-4, rank
        assert rank["plain_vs_doubled"] > 1e-2, rank


@pytest.mark.slow
@pytest.mark.parametrize("name,steps", [("trainer", 8), ("trainer_zero3", 3)])
def test_trainer_runs_cached_steps_under_zero2_and_zero3_bf16(distributed_run, name, steps):
    from train_fixtures import read_scalars

    scalars = read_scalars(distributed_run / name)
    assert sorted(scalars["loss/itc"]) == list(range(1, steps + 1))
    assert all(v == 0.0 for v in scalars["train/cache_drift"].values())  # dropout replayed under DeepSpeed
    assert all(torch.isfinite(torch.tensor(v)) for v in scalars["loss/total"].values())
    summary = json.loads((distributed_run / f"{name}.json").read_text())
    assert summary["step"] == steps and summary["nonfinite_skipped"] == 0


def _engine(model, micro: int, accum: int, stage: int):
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
              "train_batch_size": micro * accum * 2, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=config)
    return engine


def _compare(out: Path, name: str, frames: int, stage: int) -> None:
    """Three engines from the same weights on the same batches: cached (2 x 4), doubled (1 x 8), plain (2 x 4)."""
    import torch.distributed as dist

    from pipeline.train import engine as engine_lib
    from pipeline.model import build_model

    cfg = _cfg(*CONTRASTIVE_ONLY, "train.precision=fp32", "train.grad_accum=2", "train.contrastive_accum=true")
    rank = dist.get_rank()
    parts, both = _batches(cfg, frames, seeds=(10 + 2 * rank, 11 + 2 * rank))  # each rank its own rows
    runs, updates = {}, {}
    for kind in ("cached", "doubled", "plain"):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        before = [p.detach().clone() for p in model.parameters()]
        engine = _engine(model, 8 if kind == "doubled" else 4, 1 if kind == "doubled" else 2, stage)
        if kind == "cached":
            result = engine_lib.train_group_step(engine, parts, cfg.loss)
            runs[kind] = {k: float(v) for k, v in result.losses.items()}
        elif kind == "doubled":
            runs[kind] = {k: float(v) for k, v in engine_lib.train_micro_step(engine, both).losses.items()}
        else:
            steps = [engine_lib.train_micro_step(engine, p).losses for p in parts]
            runs[kind] = {k: (float(steps[0][k]) + float(steps[1][k])) / 2 for k in steps[0]}
        updates[kind] = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, engine.module.parameters())])
    report = {**runs, "cached_vs_doubled": _rel(updates["cached"], updates["doubled"]),
              "plain_vs_doubled": _rel(updates["plain"], updates["doubled"])}
    gathered = [None, None]
    dist.all_gather_object(gathered, report)
    if rank == 0:
        (out / f"{name}.json").write_text(json.dumps(gathered))


def _driver(config: str, out: Path) -> None:
    sys.path.insert(0, str(REPO))
    from train_fixtures import STEPS

    import pipeline.pretrain as pretrain
    from pipeline.train import engine as engine_lib
    from pipeline.config import load_config

    engine_lib.init_distributed()
    _compare(out, "zero0_images", frames=1, stage=0)
    _compare(out, "zero2_videos", frames=2, stage=2)
    for stage, name, steps in ((2, "trainer", STEPS), (3, "trainer_zero3", 3)):
        summary = pretrain.train(load_config(config, [f"train.zero_stage={stage}", "train.grad_accum=2",
                                                      f"train.steps={steps}", "train.contrastive_accum=true",
                                                      f"train.output_dir={out}/{name}"]))
        if int(os.environ["RANK"]) == 0:
            (out / f"{name}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    run_driver(_driver)
