"""End-to-end DeepSpeed training on CPU: 2 processes (gloo), real shards, the real loader.

Three launches (process start-up dominates on CPU, so each launch does several things):
  A  torchrun this file as a driver, calling `train(cfg)` in-process for
       ZeRO-1, with the evaluation hook at the last step;
       ZeRO-2, the uninterrupted reference of the kill-and-resume run;
       ZeRO-1 at lr=0 for 28 steps: the untrained model's loss on the same batches, the baseline of learning;
       ZeRO-1 for 4 steps, then resumed with train.steps=6 (the LR must follow the new schedule);
       ZeRO-2 with gradient accumulation, stopped by `request_checkpoint()` from a signal on one rank;
       ZeRO-3 with activation checkpointing: pretrained ViT weights must reach the partitioned
       parameters; a NaN loss once (skipped), then twice in a row (the run stops, keeping the
       last good checkpoint).
  B  torchrun pipeline/pretrain.py (ZeRO-2, 28 steps), SIGKILLed once its step-4 checkpoint is complete.
  C  deepspeed pipeline/pretrain.py --resume auto (among the overrides): continues B to the end.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_fixtures import (REPO, STEPS, kill_tree, process_env, finish, free_port, torchrun, read_scalars,
                            newest_complete_step, run_driver, write_train_data)

NAN_CALLS_ONCE, NAN_FROM_CALL = 3, 8  # rank 1's forward calls that return a NaN loss (ZeRO-3 run)
LONG = 28  # steps of the kill-and-resume pair (B + C) and its uninterrupted ZeRO-2 reference: >= 20 compared
SCHED = (4, 6)  # a run of 4 steps, resumed with train.steps=6: the new schedule from the first step

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch A in the background while B runs, kill B, then C. Returns the paths."""
    root = tmp_path_factory.mktemp("train")
    config = write_train_data(root)
    a = torchrun([Path(__file__), "--config", config, "--out", root], root / "a.log")
    b_dir = root / "zero2_resumed"
    b = torchrun(["pipeline/pretrain.py", "--config", config, "train.zero_stage=2", f"train.steps={LONG}",
                   f"train.output_dir={b_dir}"], root / "b.log")
    latest = b_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.exists() and latest.read_text().strip() >= "step_00000004"):
        assert b.poll() is None, f"run B ended before its first checkpoint:\n{(root / 'b.log').read_text()[-4000:]}"
        assert time.time() < deadline, "run B: no checkpoint in time"
        time.sleep(0.05)
    kill_tree(b)  # both ranks mid-training, then torchrun
    assert b.returncode == -signal.SIGKILL
    killed_at = newest_complete_step(b_dir)
    c = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), "pipeline/pretrain.py", "--config",
                        str(config), "train.zero_stage=2", "--resume", "auto", f"train.steps={LONG}",
                        f"train.output_dir={b_dir}"],
                       cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stdout[-6000:] + c.stderr[-3000:]
    finish(a, root / "a.log")
    return {"root": root, "config": config, "resumed": b_dir, "killed_at": killed_at, "c_log": c.stdout}


def _mean(d: dict, steps) -> float:
    return sum(d[s] for s in steps) / len(steps)


@pytest.mark.slow
def test_training_learns_against_a_frozen_model_and_the_stages_agree(runs):
    # One batch's loss swings by +-1 around another's, so learning is read against the same model
    # at lr=0 on the same batches (the loader's order is keyed by step, not by the run), over the
    # last 8 of the 28 ZeRO-2 steps; the other stages must follow ZeRO-2's trajectory.
    root = runs["root"]
    frozen = read_scalars(root / "frozen")["loss/total"]
    losses = {stage: read_scalars(root / f"zero{stage}")["loss/total"] for stage in (1, 2, 3)}
    gain = sum(frozen[s] - losses[2][s] for s in range(LONG - 7, LONG + 1)) / 8
    assert gain > 0.5, (gain, losses[2], frozen)
    # ZeRO-1 and ZeRO-2 differ in where optimizer state lives, not in maths; their schedules (8 and
    # 28 steps) agree up to the update before step 4
    for step in range(1, 5):
        assert losses[1][step] == pytest.approx(losses[2][step], rel=1e-3), step
    b_first = read_scalars(runs["resumed"], sorted((runs["resumed"] / "tensorboard").glob("events*"))[:1])
    for loss in (losses[3], b_first["loss/total"], frozen):
        assert loss[1] == pytest.approx(losses[1][1], rel=1e-2)
    # one optimizer step in, ZeRO-3 (partitioned parameters) still follows ZeRO-1; the step moved the
    # losses (read per term: their changes can cancel in the weighted total)
    terms = ("itc", "itm", "mlm", "scl_vision", "scl_text")
    trained, untrained = read_scalars(root / "zero1"), read_scalars(root / "frozen")
    assert max(abs(trained[f"loss/{t}"][2] - untrained[f"loss/{t}"][2]) for t in terms) > 0.05
    assert losses[3][2] == pytest.approx(losses[1][2], rel=2e-3)


@pytest.mark.slow
def test_evaluation_hook_metrics_reach_tensorboard(runs):
    evals = {t: v for t, v in read_scalars(runs["root"] / "zero1").items() if t.startswith("eval/")}
    assert {"eval/itc_i2t_r1", "eval/itm_r_mean"} <= set(evals)
    assert all(set(v) == {STEPS} for v in evals.values())


@pytest.mark.slow
def test_checkpoint_request_saves_and_returns(runs):
    import torch

    root = runs["root"]
    summary = json.loads((root / "requeue.json").read_text())
    assert summary["stopped_early"] and summary["step"] == 1
    assert summary["checkpoint"] == str(root / "requeue" / "checkpoints" / "step_00000001")
    assert (root / "requeue" / "checkpoints" / "latest").read_text() == "step_00000001"
    # grad_accum=2: the one optimizer step consumed two loader batches on each rank
    rank_state = torch.load(Path(summary["checkpoint"]) / "rank_00001.pt", weights_only=False)
    assert rank_state["loader"]["step_in_epoch"] == 2


@pytest.mark.slow
def test_zero3_holds_the_pretrained_vision_weights(runs):
    report = json.loads((runs["root"] / "zero3_pretrained.json").read_text())
    assert report["compared"] >= 10
    assert report["mismatched"] == []
    assert report["partitioned"], "ZeRO-3 parameters were not partitioned"
    assert report["checkpointing"]  # this run also recomputes activations in backward


@pytest.mark.slow
def test_nonfinite_loss_is_skipped_then_stops_the_run(runs):
    root = runs["root"]
    zero3 = read_scalars(root / "zero3")
    # forward call 3 was NaN on rank 1 only: both ranks skipped it, step 3 used the next batch
    assert zero3["train/nonfinite_skipped"][2] == 0 and zero3["train/nonfinite_skipped"][3] == 1
    assert max(zero3["loss/total"]) == 6  # calls 8 and 9 were NaN: max_nonfinite=2 stopped at step 7
    error = (root / "zero3_error.txt").read_text()
    assert "2 non-finite losses in a row at step 7" in error and "step_00000006" in error
    ckpt = root / "zero3" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000006"
    assert (ckpt / "step_00000006" / "complete.json").exists()


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical_to_the_uninterrupted_run(runs):
    k, resumed = runs["killed_at"], runs["resumed"]
    assert 4 <= k < 8 and LONG - k >= 20
    assert f"resumed from {resumed / 'checkpoints' / f'step_{k:08d}'} at step {k}" in runs["c_log"]
    after = read_scalars(resumed, sorted((resumed / "tensorboard").glob("events*"))[-1:])
    reference = read_scalars(runs["root"] / "zero2")
    assert min(after["loss/total"]) == k + 1 and max(after["loss/total"]) == LONG
    # >= 20 steps over three epoch boundaries: weights, optimizer, loader, masks, ITM negatives all exact
    for tag in ("loss/total", "loss/itm", "loss/scl_vision", "loss/scl_text", "loss/mlm"):
        for step in range(k + 1, LONG + 1):
            assert after[tag][step] == reference[tag][step], (tag, step)
    for tag in (t for t in reference if t.startswith("lr/")):
        for step in range(k + 1, LONG + 1):
            assert after[tag][step] == reference[tag][step], (tag, step)
    # keep_last=1: only the final checkpoint is left, and `latest` names it
    ckpts = resumed / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{LONG:08d}"]
    assert (ckpts / "latest").read_text() == f"step_{LONG:08d}"


@pytest.mark.slow
def test_resume_with_more_steps_follows_the_new_schedule(runs):
    from pipeline.config import load_config
    from pipeline.train.engine import lr_factor

    first, total = SCHED
    lrs = read_scalars(runs["root"] / "sched")
    old, new = (load_config(runs["config"], [f"train.steps={n}"]).train for n in SCHED)
    for tag, values in ((t, v) for t, v in lrs.items() if t.startswith("lr/")):
        base = values[1] / lr_factor(0, old)
        assert sorted(values) == list(range(1, total + 1))
        for step in range(1, total + 1):  # lr logged at step s was used for it: the factor after s - 1 steps
            want = base * lr_factor(step - 1, old if step <= first else new)
            assert values[step] == pytest.approx(want, rel=1e-6), (tag, step)
    assert lrs["lr/backbone_decay"][first + 1] > 0  # the old 4-step schedule had decayed to 0 here


@pytest.mark.slow
def test_tensorboard_holds_the_tags(runs):
    tags = set(read_scalars(runs["resumed"]))
    expected = {"loss/total", "loss/itc", "loss/itm", "loss/mlm", "loss/scl_vision", "loss/scl_text",
                "lr/backbone_decay", "lr/backbone_no_decay", "lr/head_decay", "lr/head_no_decay",
                "train/grad_norm", "train/nonfinite_skipped", "temperature/itc", "temperature/scl",
                "throughput/samples_per_s", "throughput/tokens_per_s", "time/data_wait_s", "time/compute_s",
                "data/skipped/corrupt_image"}
    assert expected <= tags, expected - tags
    zero3 = set(read_scalars(runs["root"] / "zero3"))  # ZeRO-3 wraps the optimizer differently
    assert {t for t in expected if t.startswith("lr/")} <= zero3 and "train/grad_norm" in zero3


@pytest.mark.slow
def test_zero_to_fp32_output_loads_into_the_model(runs, tmp_path):
    import torch

    from pipeline.train import checkpoint
    from pipeline.config import load_config
    from pipeline.data import build_train_loader
    from pipeline.model import build_model

    out = checkpoint.consolidate(runs["resumed"], tmp_path / "model_fp32.pt")
    cfg = load_config(runs["config"])
    # the run's config travels with the weights: evaluation refuses another geometry for them
    from pipeline.config import ConfigError
    from pipeline.train.checkpoint import check_model_section

    assert out.with_suffix(".yaml").is_file()
    check_model_section(out, cfg)
    with pytest.raises(ConfigError, match="model.fusion.heads: checkpoint 2, this config 4"):
        check_model_section(out, load_config(runs["config"], ["model.fusion.heads=4"]))
    model = checkpoint.load_fp32(build_model(cfg), out)
    # the fp32 master weights round to the bf16 weights DeepSpeed saved with the module
    module = torch.load(runs["resumed"] / "checkpoints" / f"step_{LONG:08d}" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().bfloat16(), module[name].reshape(p.shape)), name
    assert model.itc_temp.item() != pytest.approx(cfg.model.itc_temp_init, abs=1e-6)  # it trained
    batch = next(iter(build_train_loader(cfg, rank=0, world_size=1)))
    with torch.no_grad():
        assert torch.isfinite(model.eval()(batch)["loss"])


# ---------------------------------------------------------------- launch A (run under torchrun)
def _driver(config: str, out: Path) -> None:
    """ZeRO-1, ZeRO-2, then ZeRO-3 with a pretrained-weights check and injected NaN losses."""
    sys.path.insert(0, str(REPO))
    import deepspeed
    import torch

    import pipeline.pretrain as pretrain
    from pipeline.train import engine as engine_lib, trainer
    from pipeline.config import load_config

    def cfg(stage, **train):
        return load_config(config, [f"train.zero_stage={stage}", f"train.output_dir={out}/zero{stage}"]
                           + [f"train.{k}={v}" for k, v in train.items()])

    rank = int(os.environ["RANK"])
    # ZeRO-1 also runs the evaluation hook once, at the last step, on the first shard.
    pretrain.train(load_config(config, ["train.zero_stage=1", f"train.output_dir={out}/zero1",
                                        f"train.eval_every={STEPS}", f"eval.data={Path(config).parent}/00000.tar",
                                        "eval.num_samples=12", "eval.itm_rerank_k=2"]))
    pretrain.train(cfg(2, steps=LONG))
    pretrain.train(load_config(config, ["train.zero_stage=1", f"train.output_dir={out}/frozen", "train.lr=0.0",
                                        f"train.steps={LONG}"]))
    sched = ["train.zero_stage=1", f"train.output_dir={out}/sched", "train.save_every=100"]
    pretrain.train(load_config(config, sched + [f"train.steps={SCHED[0]}"]))
    pretrain.train(load_config(config, sched + [f"train.steps={SCHED[1]}", "train.resume=auto"]))

    # A preemption signal on one rank only: every rank saves at the next step boundary and returns.
    signal.signal(signal.SIGUSR1, lambda *_: pretrain.request_checkpoint())
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    summary = pretrain.train(load_config(config, ["train.zero_stage=2", "train.grad_accum=2",
                                                  f"train.output_dir={out}/requeue"]))
    if rank == 0:
        (out / "requeue.json").write_text(json.dumps(summary))
    real_build, real_init = pretrain.build_model, engine_lib.initialize

    def nan_model(c):
        model, calls = real_build(c), [0]
        forward = model.forward

        def patched(batch, generator=None):
            out_ = forward(batch, generator)
            calls[0] += 1
            if rank == 1 and (calls[0] == NAN_CALLS_ONCE or calls[0] >= NAN_FROM_CALL):
                out_["loss"] = out_["loss"] * float("nan")
            return out_

        model.forward = patched
        return model

    def checked_init(model, c, ds_config=None):
        engine = real_init(model, c, ds_config)
        saved = torch.load(c.model.vision.pretrained, map_location="cpu")
        params = dict(engine.module.vision.named_parameters())
        names = [n for n in saved if n in params and n != "pos_embed"]  # pos_embed is resampled to 16px
        report = {"compared": len(names), "mismatched": [], "checkpointing": engine.module.vision.grad_checkpointing,
                  "partitioned": all(params[n].numel() == 0 and params[n].ds_numel > params[n].ds_tensor.numel()
                                     for n in names if saved[n].numel() > 1000)}
        with deepspeed.zero.GatheredParameters([params[n] for n in names]):
            for n in names:
                if not torch.equal(params[n].detach().float(), saved[n].bfloat16().float()):
                    report["mismatched"].append(n)
        if rank == 0:
            (out / "zero3_pretrained.json").write_text(json.dumps(report))
        return engine

    pretrain.build_model, engine_lib.initialize = nan_model, checked_init
    try:
        pretrain.train(cfg(3, save_every=2, max_nonfinite=2, activation_checkpointing="true"))
        raise AssertionError("the ZeRO-3 run should have stopped on non-finite losses")
    except trainer.NonFiniteLoss as err:
        if rank == 0:
            (out / "zero3_error.txt").write_text(str(err))


if __name__ == "__main__":
    run_driver(_driver)
