"""Spark as dataprep's distributor, for corpora beyond one machine (`--distributor spark`).

- `session(master)`: a SparkSession on a standalone master (`spark://host:port`). Image URLs then go
  through img2dataset's own `pyspark` distributor (it uses the active session); videos and local
  images run as a Spark job whose tasks each write whole shards (`run_jobs`), so Spark's task
  retries redo a lost shard whole and the stage's incremental mode (finished shards have their
  `_stats.json`) makes a rerun after any kill write only the missing ones.
- `Daemon`: Spark's own standalone `Master` and `Worker` processes (`spark-class`), started with free
  ports and stopped by PID; `slurm/submit.py --dataprep` starts them inside a SLURM allocation.

pyspark is an optional dependency (`pip install -e '.[spark]'`); Spark 4 needs Java 17 or newer.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .common import DataprepError

REPO = Path(__file__).resolve().parents[1]


def _pyspark():
    try:
        import pyspark
    except ImportError:
        raise DataprepError("--distributor spark needs pyspark: pip install -e '.[spark]' (and Java 17 or newer)") \
            from None
    return pyspark


@contextlib.contextmanager
def session(master: str, app: str):
    """A SparkSession on `master` whose Python workers run this interpreter and find this repository;
    inside another `session()` on the same master, that one (the JVM starts once per run)."""
    if not re.match(r"^spark://[^:/]+:\d+$", master or ""):
        raise DataprepError(f"--spark-master {master!r}: expected spark://HOST:PORT of a standalone master")
    _pyspark()
    from pyspark.sql import SparkSession

    host = master[len("spark://"):].rsplit(":", 1)[0]
    if host in ("localhost", "127.0.0.1"):  # a loopback cluster: the driver and its UI stay on loopback too
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    active = SparkSession.getActiveSession()
    if active is not None and active.sparkContext.master == master:
        yield active
        return
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    spark = (SparkSession.builder.master(master).appName(app)
             .config("spark.pyspark.python", sys.executable)
             .config("spark.executorEnv.PYTHONPATH", path)
             .config("spark.executorEnv.NO_ALBUMENTATIONS_UPDATE", "1")
             .config("spark.task.maxFailures", "4")  # a lost worker's shards are run again elsewhere
             .config("spark.ui.showConsoleProgress", str(sys.stderr.isatty()).lower())
             .getOrCreate())
    print(f"[spark] application {spark.sparkContext.applicationId}, driver UI {spark.sparkContext.uiWebUrl}",
          flush=True)
    try:
        yield spark
    finally:
        spark.stop()


def run_jobs(spark, jobs: list, process) -> list[dict]:
    """One Spark task per shard job (`dataprep.shards.run_shard`); returns their stats. A task that
    fails is run again (spark.task.maxFailures), on another worker when its own was lost."""
    from .shards import _run_shard_in_process

    jobs = list(jobs)
    if not jobs:
        return []
    rdd = spark.sparkContext.parallelize([(job, process) for job in jobs], len(jobs))
    try:
        return rdd.map(_run_shard_in_process).collect()
    except Exception as err:  # py4j's error carries the executor's traceback
        raise DataprepError(f"the Spark job failed after its retries ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:300]}); finished shards are kept: run the same "
                            "command again to write the rest") from err


# ---------------------------------------------------------------- the standalone daemons
def spark_home() -> Path:
    return Path(_pyspark().__file__).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Run in the child before exec: the kernel sends it SIGTERM when the process that started it
    dies (a killed SLURM task or test leaves no daemon behind)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Daemon:
    """One Spark standalone daemon (`org.apache.spark.deploy.master.Master` or `...worker.Worker`),
    its output in `log`; `stop()` ends it by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, kind: str, args: list[str], log: Path, host: str):
        self.kind, self.log = kind, Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, SPARK_HOME=str(spark_home()), SPARK_LOCAL_IP=socket.gethostbyname(host),
                   SPARK_NO_DAEMONIZE="1", SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false")
        cls = {"master": "org.apache.spark.deploy.master.Master", "worker": "org.apache.spark.deploy.worker.Worker"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([str(spark_home() / "bin" / "spark-class"), cls[kind], *args], env=env,
                                         stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        """Until the log shows `pattern` (a regex); an error when the daemon ends or time runs out."""
        deadline = time.time() + timeout
        while True:
            found = re.search(pattern, self.log.read_text(errors="replace") if self.log.exists() else "")
            if found:
                return found
            if self.proc.poll() is not None:
                raise DataprepError(f"the Spark {self.kind} ended (exit {self.proc.returncode}); see {self.log}")
            if time.time() > deadline:
                raise DataprepError(f"the Spark {self.kind} did not come up in {timeout:.0f} s; see {self.log}")
            time.sleep(0.2)

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_master(host: str, log: Path) -> tuple[Daemon, str, str]:
    """A master on `host` at free ports; returns (daemon, spark://host:port, web UI URL) once it serves."""
    port, ui = free_port(), free_port()
    master = Daemon("master", ["--host", host, "--port", str(port), "--webui-port", str(ui)], log, host)
    master.wait_for(r"Successfully started service 'sparkMaster'")
    return master, f"spark://{host}:{port}", f"http://{host}:{ui}"


def start_worker(master_url: str, host: str, cores: int, memory: str, work_dir: Path, log: Path) -> Daemon:
    """A worker on `host` with `cores` and `memory` for executors, registered with `master_url`."""
    worker = Daemon("worker", ["--host", host, "--cores", str(cores), "--memory", memory, "--work-dir",
                               str(work_dir), "--webui-port", str(free_port()), master_url], log, host)
    worker.wait_for(r"Successfully registered with master")
    return worker
