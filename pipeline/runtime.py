"""A run's hold on its output directory, on its launcher, and on the signals that stop it.

- `OutputLock`: rank 0 holds an exclusive `flock` on `<output_dir>/.lock` while the run lives, so a
  second run on the same directory (which would write checkpoints over this one's) refuses to start.
  The kernel drops the lock when its process dies, however it dies: a killed run never blocks the
  next one. The file names the holder (host, pid) for the error message.
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
import errno
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline import distributed

log = logging.getLogger("pipeline.runtime")

LOCK = ".lock"


class RunInProgress(RuntimeError):
    pass


class OutputLock:
    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = self.path.read_text().strip() or "unknown"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunInProgress(f"{self.path.parent} is in use by a live run ({holder}); stop it, or choose "
                                    "another train.output_dir") from None
            # e.g. a file system without flock (some Lustre mounts): warn, never block training
            log.warning("cannot lock %s (%s): a second run on this directory would not be refused", self.path, err)
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%F %T')}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (its content is informational)
            self._fd = None


@contextlib.contextmanager
def hold_output_dir(output_dir, is_main: bool):
    """Rank 0 locks `output_dir` for the body; every rank raises RunInProgress when the lock is held
    elsewhere, before any model is built."""
    lock, held = OutputLock(output_dir), None
    if is_main:
        try:
            lock.acquire()
        except RunInProgress as err:
            held = err
    if distributed.any_rank(held is not None):
        raise held or RunInProgress(f"{output_dir} is in use by a live run (rank 0 says which)")
    try:
        yield
    finally:
        lock.release()


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

