"""A run's hold on its output directory and its launcher, with real torchrun launches (2 ranks, gloo):
a second run on a live run's directory refuses to start; kill -9 of torchrun alone stops its ranks;
the dead run's lock does not block the next run, which resumes."""
import os
import signal
import time

import pytest
from train_fixtures import descendants, finish, torchrun, kill_tree, newest_complete_step, write_train_data


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_lock_and_launcher_death(tmp_path):
    config = write_train_data(tmp_path)
    run = tmp_path / "run"
    common = ["pipeline/pretrain.py", "--config", config, f"train.output_dir={run}", "train.save_every=2"]
    a = torchrun(common + ["train.steps=100000"], tmp_path / "a.log", start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run / "checkpoints" / "latest").exists():
            assert a.poll() is None, (tmp_path / "a.log").read_text()[-4000:]
            assert time.time() < deadline, "run A: no checkpoint in time"
            time.sleep(0.2)
        # a second run on the same directory stops before building its model
        b = torchrun(common + ["train.steps=100000"], tmp_path / "b.log")
        b.wait(timeout=180)
        log = (tmp_path / "b.log").read_text()
        assert b.returncode != 0 and f"{run} is in use by a live run (host" in log, log[-4000:]
        assert f"pid {a.pid}" not in log  # the holder named is A's rank 0, not its launcher
        assert a.poll() is None

        ranks = descendants(a.pid)
        assert len(ranks) >= 2
        os.kill(a.pid, signal.SIGKILL)  # the launcher only: its ranks run in sessions of their own
        a.wait()
        deadline = time.time() + 20
        while any(_alive(p) for p in ranks):
            assert time.time() < deadline, [p for p in ranks if _alive(p)]
            time.sleep(0.2)
    finally:
        kill_tree(a)

    # the dead run left its lock file, but no lock: the next run starts and resumes
    assert (run / ".lock").exists()
    k = newest_complete_step(run)
    c = torchrun(common + ["--resume", "auto", f"train.steps={k + 2}"], tmp_path / "c.log")
    text = finish(c, tmp_path / "c.log")
    assert f"resumed from {run / 'checkpoints' / f'step_{k:08d}'} at step {k}" in text
