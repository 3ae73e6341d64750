"""A termination signal loses no work: real signals to the launcher or to one rank (2 ranks, ZeRO-2
bf16, gloo). Every rank finishes its step, all save, the ranks exit with EXIT_STOPPED, and the run
resumed from that checkpoint is bit-identical to one never interrupted: here it is stopped twice
(SIGTERM to torchrun, then SIGUSR2 to rank 1 under the deepspeed launcher) and finished."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_fixtures import REPO, descendants, process_env, finish, free_port, torchrun, read_scalars, write_train_data

from pipeline.train import process

STEPS = 40
TERMS = ("loss/total", "loss/itc", "loss/itm", "loss/mlm", "loss/scl_vision", "loss/scl_text")


def _args(config, out):
    return ["pipeline/pretrain.py", "--config", config, "train.zero_stage=2", f"train.output_dir={out}",
            f"train.steps={STEPS}", "train.save_every=100", "train.log_every=1"]


def _wait_for(log: Path, pattern: str, proc, timeout=300) -> re.Match:
    deadline = time.time() + timeout
    while True:
        found = re.search(pattern, log.read_text() if log.exists() else "", re.M)
        if found:
            return found
        assert proc.poll() is None, f"ended before {pattern!r}:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"no {pattern!r} in time"
        time.sleep(0.05)


def _ranks(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes below a launcher."""
    out = {}
    for pid in descendants(launcher_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if any(c.endswith(b"pipeline/pretrain.py") for c in cmd) and b"RANK" in env and b"launcher" not in b" ".join(cmd):
            out[int(env[b"RANK"])] = pid
    return out


def _saved_step(text: str, sig: str) -> int:
    return int(re.search(rf"stopped by {sig} after saving step (\d+)", text).group(1))


@pytest.mark.slow
def test_stopped_twice_by_signals_and_resumed_the_run_is_bit_identical(tmp_path):
    config = write_train_data(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    finish(torchrun(_args(config, ref), tmp_path / "ref.log"), tmp_path / "ref.log")

    # 1. SIGTERM to torchrun: it passes the signal on; the ranks save their step (torchrun, itself
    #    ended by the signal, reports no exit codes: the deepspeed launcher below passes 75 on)
    log = tmp_path / "a.log"
    proc = torchrun(_args(config, run), log)
    _wait_for(log, r"^step 5/", proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    text = log.read_text()
    first = _saved_step(text, "SIGTERM")
    assert 5 <= first < STEPS and (run / "checkpoints" / f"step_{first:08d}" / "complete.json").is_file()

    # 2. resumed under the deepspeed launcher; SIGUSR2 to rank 1 alone: the ranks agree, both save
    log = tmp_path / "b.log"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *_args(config, run)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=process_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    _wait_for(log, rf"^step {first + 3}/", proc)
    os.kill(_ranks(proc.pid)[1], signal.SIGUSR2)
    assert proc.wait(timeout=120) == process.EXIT_STOPPED, log.read_text()[-3000:]
    text = log.read_text()
    assert f"resumed from {run / 'checkpoints' / f'step_{first:08d}'} at step {first}" in text
    second = _saved_step(text, "SIGUSR2")
    assert second > first and (run / "checkpoints" / f"step_{second:08d}" / "complete.json").is_file()

    # 3. resumed again to the end: every loss of every step equals the uninterrupted run's
    finish(torchrun(_args(config, run), tmp_path / "c.log"), tmp_path / "c.log")
    want, got = read_scalars(ref), read_scalars(run)
    for tag in TERMS:
        assert sorted(got[tag]) == list(range(1, STEPS + 1)), tag
        assert got[tag] == want[tag], tag

    # 4. started again with fewer steps than the checkpoint holds: it says so and trains nothing
    text = finish(torchrun(_args(config, run)[:-3] + ["train.steps=30"], tmp_path / "d.log"), tmp_path / "d.log")
    assert f"the checkpoint is at step {STEPS}, train.steps=30: nothing left to train" in text


def test_stop_on_signals_asks_for_a_checkpoint_and_a_second_sigint_interrupts():
    asked = []
    before = signal.getsignal(signal.SIGTERM)
    with process.stop_on_signals(lambda: asked.append(1)) as received:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert received == [signal.SIGTERM, signal.SIGINT] and len(asked) == 2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is before
