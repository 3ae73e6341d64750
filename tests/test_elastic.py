"""Resume on another world size (2 -> 1 -> 2 ranks, ZeRO-2, gloo) through DeepSpeed's universal
checkpoint: the step, the LR schedule, the epoch position and the global batch carry over."""
import pytest
import torch
from train_fixtures import finish, torchrun, read_scalars, write_train_data

from pipeline.config import load_config
from pipeline.train.engine import lr_factor


def _launch(nproc: int, args, log):
    return finish(torchrun(args, log, nproc=nproc), log)


@pytest.mark.slow
def test_resume_on_fewer_then_more_ranks(tmp_path):
    config = write_train_data(tmp_path)
    run = tmp_path / "run"
    common = ["pipeline/pretrain.py", "--config", config, "train.zero_stage=2", f"train.output_dir={run}",
              "train.save_every=2", "train.keep_last=3", "train.global_batch=16"]  # 4 per rank
    text = _launch(2, common + ["train.steps=4"], tmp_path / "a.log")
    assert "global batch 16 = 4 per rank x 2 ranks x 2 accumulation steps" in text
    text = _launch(1, common + ["train.steps=6"], tmp_path / "b.log")
    ckpts = run / "checkpoints"
    assert f"{ckpts / 'step_00000004'} was written by 2 ranks, this run has 1" in text
    assert f"resumed from {ckpts / 'step_00000004'} at step 4" in text
    assert "global batch 16 = 4 per rank x 1 ranks x 4 accumulation steps" in text
    text = _launch(2, common + ["train.steps=8"], tmp_path / "c.log")
    assert f"{ckpts / 'step_00000006'} was written by 1 ranks, this run has 2" in text
    assert f"resumed from {ckpts / 'step_00000006'} at step 6" in text
    assert "global batch 16 = 4 per rank x 2 ranks x 2 accumulation steps" in text
    assert not (ckpts / "universal").exists()  # each conversion (and latest_universal) removed once loaded

    # the samples seen carry over: every optimizer step took the global batch of 16, whatever the ranks
    for step, world in ((4, 2), (6, 1)):
        state = torch.load(ckpts / f"step_{step:08d}" / "rank_00000.pt", weights_only=False)["loader"]
        micro_steps = state["epoch"] * state["steps_per_epoch"] + state["step_in_epoch"]
        assert micro_steps * 4 * world == 16 * step, (step, state)
    # the LR follows each run's schedule from the step it resumed at; every loss is finite
    scalars = read_scalars(run)
    assert sorted(scalars["loss/total"]) == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(v)) for v in scalars["loss/total"].values())
    lr = scalars["lr/backbone_decay"]
    for first, steps in ((5, 6), (7, 8)):
        tc = load_config(config, [f"train.steps={steps}"]).train
        base = lr[1] / lr_factor(0, tc)
        for s in (first, first + 1):
            assert lr[s] == pytest.approx(base * lr_factor(s - 1, tc), rel=1e-6), s


@pytest.mark.slow
def test_universal_conversion_keeps_weights_and_optimizer_moments(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.train import checkpoint

    config = write_train_data(tmp_path)
    run = tmp_path / "run"
    _launch(2, ["pipeline/pretrain.py", "--config", config, "train.zero_stage=2", f"train.output_dir={run}",
                "train.steps=2"], tmp_path / "a.log")
    tag = run / "checkpoints" / "step_00000002"
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    universal = checkpoint.to_universal(tag)
    compared = 0
    for name, weight in fp32.items():
        folder = universal / "zero" / name
        if not folder.is_dir():
            continue
        saved = torch.load(folder / "fp32.pt", weights_only=False)["param"]
        assert torch.equal(saved.reshape(weight.shape).float(), weight.float()), name
        moment = torch.load(folder / "exp_avg_sq.pt", weights_only=False)["param"]
        assert moment.shape == saved.shape and (moment >= 0).all() and moment.abs().sum() > 0, name
        compared += 1
    assert compared == len(fp32)
