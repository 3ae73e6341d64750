"""`--distributor spark` on a real Spark standalone cluster on 127.0.0.1 (pyspark's own spark-class).

The module starts a master and a worker (stopped by PID at the end); the corpus is the synthetic one,
served by a loopback server whose delay makes jobs slow enough to kill in the middle.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from train_fixtures import descendants, process_env

from dataprep import shapes
from dataprep.serve import Faults, LoopbackServer

pyspark = pytest.importorskip("pyspark", reason="the spark extra is not installed (pip install -e '.[spark]')")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("Spark needs Java 17 or newer; none found", allow_module_level=True)

from dataprep import spark  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("spark")
    master, url, _ = spark.start_master("127.0.0.1", root / "master.log")
    daemons = [master]
    try:
        daemons.append(spark.start_worker(url, "127.0.0.1", 2, "1g", root / "work_a", root / "worker_a.log"))
        yield {"url": url, "root": root, "daemons": daemons}
    finally:
        for d in reversed(daemons):
            d.stop()
    assert all(d.proc.poll() is not None for d in daemons)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    faults = Faults()
    with LoopbackServer(root, faults) as server:
        paths = shapes.generate(root, n_images=60, n_videos=48, n_eval_images=4, n_eval_videos=4,
                                base_url=server.url)
        yield {"images": paths["images_train"], "videos": paths["videos_train"], "faults": faults}


def _config(path: Path, modality: str, input_file: str, out: Path, shard_size: int, threads: int) -> Path:
    cfg = {"name": f"spark_{modality}s", "modality": modality, "format": "cc3m" if modality == "image" else "webvid",
           "input": str(input_file), "output_dir": str(out), "shard_size": shard_size, "threads": threads,
           "image_size": 64, "video_size": 64, "fps": 8, "max_duration": 4, "retries": 1, "timeout": 20,
           "allow_private_urls": True}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _dataprep(*args, wait: bool = True, log: Path | None = None):
    cmd = [sys.executable, "-m", "dataprep", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=process_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
    done = subprocess.run(cmd, cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _on_spark(cluster) -> list[str]:
    return ["--distributor", "spark", "--spark-master", cluster["url"]]


def _samples(out: Path) -> list[tuple[str, str]]:
    """(source key, caption) of every sample in the shards, duplicates kept."""
    found = []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                found.append((json.loads(data)["source_key"], members[key + ".txt"].decode()))
    return sorted(found)


def _table(out: Path) -> list[tuple[str, str]]:
    df = pd.read_parquet(out / "_prep" / "annotations.parquet")
    return sorted(zip(df["key"], df["caption"]))


def _ran_on(work_dir: Path, log: str) -> list[Path]:
    """The executor logs, in `work_dir`, of the Spark application the run printed."""
    app = re.search(r"\[spark\] application (app-\S+?),", log).group(1)
    return [p for p in (work_dir / app).glob("*/stderr") if "Finished task" in p.read_text()]


def _wait(condition, what: str, timeout: float = TIMEOUT_S):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _local_run(corpus, tmp_path, modality: str, shard_size: int) -> list:
    """The same corpus through the multiprocessing path: the reference."""
    _dataprep("run", _config(tmp_path / "local.yaml", modality, corpus[f"{modality}s"], tmp_path / "local",
                             shard_size, 4))
    return _samples(tmp_path / "local")


def test_images_driver_killed_mid_job_rerun_matches_multiprocessing(cluster, corpus, tmp_path):
    """img2dataset's pyspark distributor on the cluster; the driver (and its JVM) killed after the first
    shard: the same command writes only the missing shards, and the shards equal the local run's."""
    out = tmp_path / "shards"
    cfg = _config(tmp_path / "c.yaml", "image", corpus["images"], out, 10, 2)
    corpus["faults"].delay_s = 0.3
    try:
        job = _dataprep("run", cfg, *_on_spark(cluster), wait=False, log=tmp_path / "log1")
        _wait(lambda: list(out.glob("*_stats.json")), "a finished shard")
        tree = descendants(job.pid)  # the driver's JVM and Python workers
        os.killpg(job.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.wait()
    finally:
        corpus["faults"].delay_s = 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    assert 0 < len(before) < 6, (tmp_path / "log1").read_text()[-3000:]

    log = _dataprep("run", cfg, *_on_spark(cluster))
    assert f"6 shards, {6 - len(before)} to do" in log
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before  # finished shards untouched
    assert _ran_on(cluster["root"] / "work_a", log), "no task of the rerun finished on the worker"
    assert _samples(out) == _local_run(corpus, tmp_path, "image", 10) == _table(out)
    assert json.loads((out / "report.json").read_text())["ok"]


def test_videos_worker_killed_mid_job_shards_redone_elsewhere_match_multiprocessing(cluster, corpus, tmp_path):
    """The video stage as a Spark job of whole shards; kill -9 of a second worker and its executor (a
    node lost) while it runs tasks: Spark runs them again on the first, no sample missing, none twice."""
    root = cluster["root"]
    second = spark.start_worker(cluster["url"], "127.0.0.1", 2, "1g", root / "work_b", root / "worker_b.log")
    out = tmp_path / "shards"
    cfg = _config(tmp_path / "c.yaml", "video", corpus["videos"], out, 4, 1)
    corpus["faults"].delay_s = 0.4
    try:
        job = _dataprep("run", cfg, *_on_spark(cluster), wait=False, log=tmp_path / "log")
        _wait(lambda: list((root / "work_b").glob("app-*/*/stderr")) and list(out.glob("*_stats.json")),
              "a finished shard with the second worker's executor up")
        for pid in descendants(second.pid) + [second.pid]:
            os.kill(pid, signal.SIGKILL)
        assert job.wait(TIMEOUT_S) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        corpus["faults"].delay_s = 0
        second.stop()
    log = (tmp_path / "log").read_text()
    assert re.search(r"Lost (task|executor)", log), log[-3000:]  # the driver saw it go and ran its tasks again
    assert _ran_on(root / "work_a", log), "no task finished on the surviving worker"
    assert _samples(out) == _local_run(corpus, tmp_path, "video", 4) == _table(out)
    assert json.loads((out / "report.json").read_text())["ok"]
