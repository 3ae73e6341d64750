"""Image download throughput: the project's dataprep stage, on this machine's processes and on a Spark
standalone cluster, against the same img2dataset call made directly, in one run, over one loopback server.

Both download the same photo-sized JPEGs (640x480) from a 127.0.0.1 server and resize them with the
same settings. The stage adds its own work around the call (reading and normalising the annotation
list, writing the table, checking which shards are done); the ratio stage/direct shows what that
costs. Wall-clock rates include img2dataset's start of its worker processes, which dominates small
runs; "inside shards" divides by the time its workers report in _stats.json. Validation (decoding
every stored image) is timed apart, as it is an extra pass. The runs alternate, so that a change in
machine load hits all alike.

The Spark path (`--distributor spark`) runs on a master and one worker on 127.0.0.1 with as many cores
as `--processes`; the JVMs' start-up (master, worker, the driver's SparkSession) is timed apart, once,
since a cluster job pays it once per run, not per shard. Without pyspark the path is left out.

    python bench/bench_dataprep.py [--images 600] [--image-size 256] [--processes 1] [--threads 16]
                                   [--shard-size 200] [--repeats 2] [--no-spark]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dataprep import stages  # noqa: E402
from dataprep.config import CorpusConfig  # noqa: E402
from dataprep.serve import LoopbackServer  # noqa: E402
from _media import photo  # noqa: E402


def direct(parquet: Path, out: Path, args) -> float:
    import img2dataset

    start = time.perf_counter()
    img2dataset.download(url_list=str(parquet), input_format="parquet", url_col="url", caption_col="caption",
                         output_folder=str(out), output_format="webdataset", image_size=args.image_size,
                         resize_mode="keep_ratio", processes_count=args.processes, thread_count=args.threads,
                         number_sample_per_shard=args.shard_size, timeout=10, retries=2, extract_exif=False,
                         compute_hash=None, encode_quality=95, encode_format="jpg", enable_wandb=False)
    return time.perf_counter() - start


def through_stage(cfg: CorpusConfig) -> tuple[float, float]:
    start = time.perf_counter()
    stages.annotations(cfg)
    stages.download(cfg)
    download_s = time.perf_counter() - start
    start = time.perf_counter()
    report = stages.validate_stage(cfg)
    assert report["ok"], report["errors"]
    return download_s, time.perf_counter() - start


def start_spark(work: Path, cores: int, stack: contextlib.ExitStack) -> tuple[str, dict]:
    """Master + worker on loopback and a driver session on them, stopped by `stack`; (master URL,
    seconds each took to come up). The first job starts the executor and its Python worker."""
    from dataprep import spark

    seconds, t = {}, time.perf_counter()
    master, url, _ = spark.start_master("127.0.0.1", work / "spark" / "master.log")
    stack.callback(master.stop)
    seconds["master"], t = time.perf_counter() - t, time.perf_counter()
    worker = spark.start_worker(url, "127.0.0.1", cores, "1g", work / "spark" / "work", work / "spark" / "worker.log")
    stack.callback(worker.stop)
    seconds["worker"], t = time.perf_counter() - t, time.perf_counter()
    session = stack.enter_context(spark.session(url, "bench_dataprep"))
    seconds["driver session"], t = time.perf_counter() - t, time.perf_counter()
    session.sparkContext.parallelize(range(cores), cores).map(lambda x: x).collect()
    seconds["executor"] = time.perf_counter() - t
    return url, seconds


def successes(out: Path) -> int:
    return sum(pd.read_parquet(p)["status"].eq("success").sum() for p in out.glob("0*.parquet"))


def shard_seconds(out: Path) -> float:
    """Time img2dataset's workers spent in shards (its _stats.json), i.e. without process start-up."""
    return sum(json.loads(p.read_text())["duration"] for p in out.glob("*_stats.json"))


def stage_config(work: Path, name: str, args, **extra) -> CorpusConfig:
    return CorpusConfig(name="bench", format="cc3m", input=str(work / "list.tsv"), output_dir=str(work / name),
                        image_size=args.image_size, resize_mode="keep_ratio", processes=args.processes,
                        threads=args.threads, shard_size=args.shard_size, timeout=10, retries=2,
                        allow_private_urls=True, **extra)


def measure(rates: dict, path: str, out: Path, seconds: float) -> None:
    n = successes(out)
    rates.setdefault(path, []).append(n / seconds)
    rates.setdefault(f"{path} shards", []).append(n / shard_seconds(out))


def one_repeat(work: Path, r: int, args, spark_url: str | None, rates: dict) -> None:
    out = work / f"direct_{r}"
    measure(rates, "direct", out, direct(work / "list.parquet", out, args))
    shutil.rmtree(out)
    paths = {"stage": {}}
    if spark_url:
        paths["spark"] = {"distributor": "spark", "spark_master": spark_url}
    for path, extra in paths.items():
        cfg = stage_config(work, f"{path}_{r}", args, **extra)
        download_s, validate_s = through_stage(cfg)
        measure(rates, path, Path(cfg.output_dir), download_s)
        rates.setdefault("validate", []).append(successes(Path(cfg.output_dir)) / validate_s)
        shutil.rmtree(cfg.output_dir)
    print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items() if "shards" not in k),
          flush=True)


def report(rates: dict, startup: dict, args) -> None:
    med = {k: statistics.median(v) for k, v in rates.items()}
    names = {"direct": "img2dataset.download called directly (multiprocessing)",
             "stage": "dataprep stage (annotations + download), multiprocessing",
             "spark": f"dataprep stage, --distributor spark (1 worker, {args.processes} core(s))"}
    print("\n| path | images/s, wall clock (median) | images/s, inside shards (median) |")
    print("| --- | --- | --- |")
    for key, name in names.items():
        if key in med:
            print(f"| {name} | {med[key]:.1f} | {med[key + ' shards']:.1f} |")
    print(f"| dataprep validate (decode every image) | {med['validate']:.1f} | |")
    print(f"\nratio stage/direct: {med['stage'] / med['direct']:.3f} (wall clock), "
          f"{med['stage shards'] / med['direct shards']:.3f} (inside shards)")
    if "spark" in med:
        print(f"ratio multiprocessing/spark: {med['stage'] / med['spark']:.3f} (wall clock, JVMs already up), "
              f"{med['stage shards'] / med['spark shards']:.3f} (inside shards)")
        print("Spark start-up, once per run: " + ", ".join(f"{k} {v:.1f} s" for k, v in startup.items())
              + f" (total {sum(startup.values()):.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-spark", action="store_true", help="leave out the Spark path")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_dataprep_"))
    rng = np.random.default_rng(0)
    (work / "www").mkdir()
    for i in range(args.images):
        (work / "www" / f"{i}.jpg").write_bytes(photo(rng))
    print(f"{args.images} JPEGs of 640x480 -> {args.image_size}, {args.processes} process(es) x "
          f"{args.threads} threads, {args.shard_size} per shard; cpus: {os.cpu_count()}", flush=True)
    rates, startup = {}, {}
    with LoopbackServer(work / "www") as srv, contextlib.ExitStack() as stack:
        rows = pd.DataFrame({"url": [f"{srv.url}/{i}.jpg" for i in range(args.images)],
                             "caption": [f"photo number {i}" for i in range(args.images)]})
        rows.to_parquet(work / "list.parquet", index=False)
        (work / "list.tsv").write_text("".join(f"{c}\t{u}\n" for u, c in zip(rows.url, rows.caption)))
        spark_url = None
        if not args.no_spark and importlib.util.find_spec("pyspark"):
            spark_url, startup = start_spark(work, args.processes, stack)
        for r in range(args.repeats):
            one_repeat(work, r, args, spark_url, rates)
    shutil.rmtree(work)
    report(rates, startup, args)


if __name__ == "__main__":
    main()
