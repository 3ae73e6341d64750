"""One run per output directory: rank 0 holds an exclusive `flock` on `<output_dir>/.lock` while the
run lives, so a second run on the same directory (which would write checkpoints over this one's)
refuses to start. The kernel drops the lock when its process dies, however it dies: a killed run
never blocks the next one. The file names the holder (host, pid) for the error message.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from pipeline import distributed

log = logging.getLogger("pipeline.train")

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
