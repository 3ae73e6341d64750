"""Checkpoints from others run no code. A real 2-rank DeepSpeed run (ZeRO-2 bf16) is saved; a pickle
payload that would create a marker file is planted in its DeepSpeed model states (complete.json
rewritten to match, as an attacker would) or in a rank file. Every way of opening the run refuses it,
naming the file and the class, and the marker never appears. The shareable form is safetensors with
the run's config in its metadata, checked against the geometry of whoever loads it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import REPO, process_env, finish, torchrun, write_train_data

from pipeline.train import checkpoint

pytestmark = pytest.mark.slow
PAYLOAD_CLASS = "io.open"  # what the planted pickle calls: open(marker, "w")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    config = write_train_data(root)
    out = root / "run"
    log = root / "train.log"
    finish(torchrun(["pipeline/pretrain.py", "--config", config, "train.zero_stage=2", f"train.output_dir={out}",
                       "train.steps=4", "train.save_every=2"], log), log)
    return {"root": root, "config": config, "run": out}


def _plant(src: Path, dst: Path, target: str) -> tuple[Path, Path]:
    """A copy of the run with a payload in `target` of its newest checkpoint; complete.json rewritten
    so that the file sizes match (the damage checks pass). Returns (planted file, marker)."""
    shutil.copytree(src, dst)
    tag = dst / "checkpoints" / "step_00000004"
    marker = dst.parent / f"{dst.name}.ran"
    path = tag / target
    state = torch.load(path, weights_only=False)  # this test's own, trusted file
    state["extra"] = Payload(marker)
    torch.save(state, path)
    complete = json.loads((tag / checkpoint.COMPLETE).read_text())
    complete["files"] = checkpoint.file_sizes(tag)
    (tag / checkpoint.COMPLETE).write_text(json.dumps(complete))
    return path, marker


def _run(args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=process_env(), capture_output=True, text=True,
                          timeout=timeout)


def _refused(proc_or_text, path: Path) -> None:
    text = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stdout + proc_or_text.stderr
    assert f"{path}: refused: it holds {PAYLOAD_CLASS}" in text, text[-3000:]


def test_a_payload_in_deepspeed_model_states_is_refused_everywhere(run, tmp_path):
    from pipeline.model import build_model
    from pipeline.config import load_config
    from pipeline.tasks.common import load_pretrained

    bad = tmp_path / "run"
    path, marker = _plant(run["run"], bad, "mp_rank_00_model_states.pt")
    data = str(run["root"] / "{00000..00001}.tar")
    # evaluation of the run directory
    proc = _run(["-m", "pipeline.evaluate", "--checkpoint", bad, "--data", data, "--rerank-k", "0"])
    assert proc.returncode != 0
    _refused(proc, path)
    # consolidation for sharing
    proc = _run(["-m", "pipeline.train.checkpoint", bad, "--out", tmp_path / "model.safetensors"])
    assert proc.returncode != 0 and not (tmp_path / "model.safetensors").exists()
    _refused(proc, path)
    # fine-tuning's --init (the loader finetune.py uses)
    model = build_model(load_config(run["config"]))
    with pytest.raises(checkpoint.UnsafeCheckpoint) as err:
        load_pretrained(model, str(bad), (), tmp_path)
    _refused(str(err.value), path)
    # resuming training on 2 ranks, --resume auto: both ranks stop, no step is trained
    log = tmp_path / "resume.log"
    proc = torchrun(["pipeline/pretrain.py", "--config", run["config"], "train.zero_stage=2", f"train.output_dir={bad}",
                      "train.steps=6", "train.save_every=2"], log)
    proc.wait(timeout=240)
    assert proc.returncode != 0
    _refused(log.read_text(), path)
    assert not (bad / "checkpoints" / "step_00000006").exists()
    assert not marker.exists()


def test_a_payload_in_a_rank_file_is_refused_on_resume(run, tmp_path):
    bad = tmp_path / "run"
    path, marker = _plant(run["run"], bad, "rank_00000.pt")
    tag = bad / "checkpoints" / "step_00000004"
    log = tmp_path / "resume.log"
    proc = torchrun(["pipeline/pretrain.py", "--config", run["config"], "train.zero_stage=2", f"train.output_dir={bad}",
                      "train.steps=6", f"--resume={tag}"], log)
    proc.wait(timeout=240)
    assert proc.returncode != 0
    _refused(log.read_text(), path)
    assert not marker.exists() and not (bad / "checkpoints" / "step_00000006").exists()


def test_safetensors_export_carries_the_config_and_refuses_another_geometry(run, tmp_path):
    out = tmp_path / "model.safetensors"
    proc = _run(["-m", "pipeline.train.checkpoint", run["run"], "--out", out])
    assert proc.returncode == 0, proc.stderr
    state, config = checkpoint.read_weights(out)
    assert "model:" in config and "vision.pos_embed" in state
    data = str(run["root"] / "{00000..00001}.tar")
    proc = _run(["-m", "pipeline.evaluate", "--checkpoint", out, "--data", data, "--rerank-k", "0",
                 "--json", tmp_path / "m.json"])  # the config comes from the file
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "m.json").read_text())["n_items"] > 0
    proc = _run(["-m", "pipeline.evaluate", "--checkpoint", out, "--data", data, "--config", run["config"],
                 "model.fusion.heads=4", "model.text.heads=4"])  # same shapes, another head count
    assert proc.returncode != 0 and "model.fusion.heads: checkpoint 2, this config 4" in proc.stderr
