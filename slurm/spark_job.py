"""A dataprep run across a SLURM allocation on Spark (`slurm/submit.py --dataprep CORPUS`).

One task per node. Task 0 starts Spark's standalone Master on the first node and writes where it
listens to <job dir>/spark/master.json; every task starts a Worker on its node with its task's CPUs;
task 0 then runs the driver (`dataprep.stages.run` with `distributor: spark`) and writes
<job dir>/spark/done.json. Every task stops its daemons by PID at the end, on an error, or when SLURM
signals it; a requeued job (time limit, preemption) starts them afresh and the stages' incremental
mode writes only the missing shards. Everything stays in the job directory:

    <job dir>/spark/master.json     the master's spark:// URL and web UI of this attempt
    <job dir>/spark/daemons.json    host, kind and PID of every daemon started (one line each)
    <job dir>/spark/logs/           each daemon's log
    <job dir>/spark/work/task<i>-<host>/   executor logs: app-*/<executor>/stderr
    <job dir>/submitit/             the sbatch script and each task's log
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import submitit

from slurm.submit import RequeueingJob


class DataprepJob(RequeueingJob):
    """One task (one node) of a Spark dataprep job; a requeue starts the cluster again and the stages
    write only the missing shards."""

    resume_hint = "submit the same command again to write the missing shards"

    def __init__(self, corpus: str, overrides: dict, job_dir: str, max_requeues: int, memory: str | None = None):
        self.corpus, self.overrides, self.job_dir = corpus, overrides, Path(job_dir)
        self.max_requeues, self.memory, self.requeues = max_requeues, memory, 0

    @property
    def spark_dir(self) -> Path:
        return self.job_dir / "spark"

    def __call__(self) -> dict:
        from dataprep import spark

        job = submitit.JobEnvironment()
        host = job.hostnames[job.node] if job.num_nodes > 1 else socket.gethostname()
        address = socket.gethostbyname(host)
        os.environ["SPARK_LOCAL_IP"] = address  # the driver, its UI and the executors bind to the node's address
        attempt = f"{job.job_id}.{self.requeues}"
        print(f"task {job.global_rank}/{job.num_tasks} on {host} ({address}), attempt {attempt}", flush=True)
        daemons = []
        try:
            if job.global_rank == 0:
                master, url, ui = spark.start_master(host, self._log("master", host))
                daemons.append(self._record(master, host, 0))
                _write_json(self.spark_dir / "master.json", {"attempt": attempt, "url": url, "ui": ui})
                print(f"Spark master {url}, web UI {ui}", flush=True)
            url = self._wait_for_master(attempt)
            cores = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count())
            # the executors' JVM side; the shards are written by Python workers beside it
            name = f"task{job.global_rank}-{host}"
            worker = spark.start_worker(url, host, cores, self.memory or "2g",
                                        self.spark_dir / "work" / name, self._log("worker", name))
            daemons.append(self._record(worker, host, job.global_rank))
            print(f"Spark worker on {host}: {cores} cores", flush=True)
            if job.global_rank == 0:
                return self._drive(url, attempt)
            return self._wait_for_driver(attempt, url)
        finally:
            for daemon in reversed(daemons):
                daemon.stop()
            print(f"stopped {len(daemons)} Spark daemon(s) on {host}", flush=True)

    def _drive(self, url: str, attempt: str) -> dict:
        from dataprep import stages
        from dataprep.config import load_config

        outcome = {"attempt": attempt, "ok": False}
        try:
            cfg = load_config(self.corpus, {**self.overrides, "distributor": "spark", "spark_master": url})
            reports = stages.run(cfg)
            outcome = {"attempt": attempt, "ok": all(r["ok"] for r in reports.values()),
                       "samples": {split: r["samples"]["valid"] for split, r in reports.items()}}
            return outcome
        finally:
            _write_json(self.spark_dir / "done.json", outcome)

    def _wait_for_master(self, attempt: str) -> str:
        path = self.spark_dir / "master.json"
        deadline = time.time() + 600
        while time.time() < deadline:
            found = _read_json(path)
            if found.get("attempt") == attempt:
                return found["url"]
            time.sleep(1)
        raise RuntimeError(f"no Spark master of attempt {attempt} in {path} after 600 s; see task 0's log")

    def _wait_for_driver(self, attempt: str, url: str) -> dict:
        """Until task 0 says the run ended, or its master has been unreachable for a minute (task 0 died)."""
        path, host_port = self.spark_dir / "done.json", url[len("spark://"):].rsplit(":", 1)
        last_seen = time.time()
        while _read_json(path).get("attempt") != attempt:
            if _reachable(host_port[0], int(host_port[1])):
                last_seen = time.time()
            elif time.time() - last_seen > 60:
                raise RuntimeError(f"the Spark master {url} has been gone for a minute and task 0 wrote no "
                                   f"{path}: see task 0's log")
            time.sleep(2)
        return _read_json(path)

    def _log(self, kind: str, host: str) -> Path:
        return self.spark_dir / "logs" / f"{kind}-{host}.log"

    def _record(self, daemon, host: str, task: int):
        with open(self.spark_dir / "daemons.json", "a") as f:
            f.write(json.dumps({"host": host, "task": task, "kind": daemon.kind, "pid": daemon.pid}) + "\n")
        return daemon


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
