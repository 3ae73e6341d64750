"""A rank's process: its launcher, the signals that stop it, and how it ends.

- `exit_with_launcher()`: a rank started by torchrun / the deepspeed launcher stops when that
  launcher dies (kill -9 of the launcher would otherwise leave the ranks training, in sessions of
  their own, and writing checkpoints beside a restarted run).
- `stop_on_signals()`: SIGTERM, SIGUSR2 and SIGINT (what torchrun, the deepspeed launcher, SLURM at a
  time limit or preemption, and a Ctrl-C send) ask for a checkpoint at the next step boundary; every
  rank finishes its step, all save, and the entry point exits with EXIT_STOPPED (`exit_stopped`),
  requeueing a SLURM batch job first.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

_watching = False


def exit_with_launcher(poll_s: float = 1.0) -> None:
    """When launched by torchrun or the deepspeed launcher (LOCAL_RANK / TORCHELASTIC_RUN_ID set),
    exit as soon as the launcher process is gone (this process is re-parented). Plain `python` runs
    (nohup, srun) are left alone: their parent may go away legitimately."""
    global _watching
    if _watching or not ({"TORCHELASTIC_RUN_ID", "LOCAL_RANK"} & set(os.environ)):
        return
    launcher = os.getppid()
    if launcher == 1:
        return

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != launcher:
                sys.stderr.write(f"rank pid {os.getpid()}: its launcher (pid {launcher}) died; stopping\n")
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    _watching = True


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal after saving the step's checkpoint; the same command resumes


@contextlib.contextmanager
def stop_on_signals(request):
    """Within: SIGTERM, SIGUSR2 and SIGINT call `request()` (save at the next step boundary, then stop)
    instead of ending the process; a second SIGINT interrupts at once. Yields the signals received.
    Launchers wait before killing (torchrun and the deepspeed launcher 30 s, SLURM its KillWait):
    a step and a save must fit in that time."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield received
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in received:
            raise KeyboardInterrupt
        received.append(signum)
        request()

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def exit_stopped(summary: dict, max_requeues: int) -> None:
    """End an entry point whose run a signal stopped after saving: say so (rank 0), requeue the SLURM
    batch job it runs in (SIGTERM or SIGUSR2: a time limit or a preemption; at most `max_requeues`
    times), and exit with EXIT_STOPPED on every rank."""
    from pipeline import distributed

    name = summary.get("signal") or "a checkpoint request"
    if distributed.detect().rank == 0:
        print(f"stopped by {name} after saving step {summary['step']} ({summary['checkpoint']}); the same "
              "command resumes from it", flush=True)
        if name in ("SIGTERM", "SIGUSR2") and os.environ.get("SLURM_JOB_ID"):
            requeue(os.environ["SLURM_JOB_ID"], max_requeues)
    exit_now(EXIT_STOPPED)


def exit_now(code: int = 0) -> None:
    """End the process once its output is flushed, skipping the interpreter's teardown of the
    modules (5-10 s after a DeepSpeed run: more than SLURM's KillWait leaves after a save). Everything
    of the run is on disk by then: checkpoints are fsynced, TensorBoard closed, the process group gone."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def requeue(job_id: str, max_requeues: int) -> bool:
    """`scontrol requeue` the job unless it was requeued `max_requeues` times (SLURM_RESTART_COUNT)."""
    done = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if done >= max_requeues:
        print(f"not requeued: job {job_id} was requeued {done} times (train.max_requeues={max_requeues})", flush=True)
        return False
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if out.returncode == 0:
        print(f"requeued job {job_id} (requeue {done + 1} of {max_requeues})", flush=True)
        return True
    print(f"job {job_id} could not be requeued ({(out.stderr or out.stdout).strip()}); submit it again to "
          "resume", flush=True)
    return False


def run_entry_point(run, config: str, overrides: list[str], print_config: bool) -> dict | None:
    """What pretrain.py and finetune.py do with their arguments: log on rank 0, load the config (or
    print it and stop), `run(cfg)` on every rank, leave the process group, and exit EXIT_STOPPED when
    a signal stopped the run (after requeueing a SLURM batch job)."""
    import torch

    from pipeline import distributed
    from pipeline.config import config_yaml, load_config

    logging.basicConfig(level=logging.INFO if distributed.detect().rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(config, overrides)
    if print_config:
        print(config_yaml(cfg), end="")
        return None
    summary = run(cfg)
    if distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if summary["stopped_early"]:  # a signal: the step was saved
        exit_stopped(summary, cfg.train.max_requeues)
    return summary

