"""Image download throughput: the project's dataprep stage against the same img2dataset call made
directly, in one run, over one loopback server.

Both download the same photo-sized JPEGs (640x480) from a 127.0.0.1 server and resize them with the
same settings. The stage adds its own work around the call (reading and normalising the annotation
list, writing the table, checking which shards are done); the ratio stage/direct shows what that
costs. Wall-clock rates include img2dataset's start of its worker processes, which dominates small
runs; "inside shards" divides by the time its workers report in _stats.json. Validation (decoding
every stored image) is timed apart, as it is an extra pass. The runs alternate, so that a change in
machine load hits both alike.

    python bench/bench_dataprep.py [--images 600] [--image-size 256] [--processes 1] [--threads 16]
                                   [--shard-size 200] [--repeats 2]
"""
from __future__ import annotations

import argparse
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


def successes(out: Path) -> int:
    return sum(pd.read_parquet(p)["status"].eq("success").sum() for p in out.glob("0*.parquet"))


def shard_seconds(out: Path) -> float:
    """Time img2dataset's workers spent in shards (its _stats.json), i.e. without process start-up."""
    return sum(json.loads(p.read_text())["duration"] for p in out.glob("*_stats.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_dataprep_"))
    rng = np.random.default_rng(0)
    (work / "www").mkdir()
    for i in range(args.images):
        (work / "www" / f"{i}.jpg").write_bytes(photo(rng))
    print(f"{args.images} JPEGs of 640x480 -> {args.image_size}, {args.processes} process(es) x "
          f"{args.threads} threads, {args.shard_size} per shard; cpus: {os.cpu_count()}", flush=True)
    rates = {"direct": [], "stage": [], "validate": [], "direct_shards": [], "stage_shards": []}
    with LoopbackServer(work / "www") as srv:
        rows = pd.DataFrame({"url": [f"{srv.url}/{i}.jpg" for i in range(args.images)],
                             "caption": [f"photo number {i}" for i in range(args.images)]})
        rows.to_parquet(work / "list.parquet", index=False)
        (work / "list.tsv").write_text("".join(f"{c}\t{u}\n" for u, c in zip(rows.url, rows.caption)))
        for r in range(args.repeats):
            out = work / f"direct_{r}"
            seconds = direct(work / "list.parquet", out, args)
            rates["direct"].append(successes(out) / seconds)
            rates["direct_shards"].append(successes(out) / shard_seconds(out))
            shutil.rmtree(out)
            cfg = CorpusConfig(name="bench", format="cc3m", input=str(work / "list.tsv"),
                               output_dir=str(work / f"stage_{r}"), image_size=args.image_size,
                               resize_mode="keep_ratio", processes=args.processes, threads=args.threads,
                               shard_size=args.shard_size, timeout=10, retries=2, allow_private_urls=True)
            download_s, validate_s = through_stage(cfg)
            n = successes(Path(cfg.output_dir))
            rates["stage"].append(n / download_s)
            rates["stage_shards"].append(n / shard_seconds(Path(cfg.output_dir)))
            rates["validate"].append(n / validate_s)
            shutil.rmtree(cfg.output_dir)
            print(f"repeat {r + 1}: direct {rates['direct'][-1]:.1f} img/s, stage {rates['stage'][-1]:.1f} img/s, "
                  f"validate {rates['validate'][-1]:.1f} img/s", flush=True)
    shutil.rmtree(work)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print()
    print("| path | images/s, wall clock (median) | images/s, inside shards (median) |")
    print("| --- | --- | --- |")
    print(f"| img2dataset.download called directly | {med['direct']:.1f} | {med['direct_shards']:.1f} |")
    print(f"| dataprep stage (annotations + download) | {med['stage']:.1f} | {med['stage_shards']:.1f} |")
    print(f"| dataprep validate (decode every image) | {med['validate']:.1f} | |")
    print(f"\nratio stage/direct: {med['stage'] / med['direct']:.3f} (wall clock), "
          f"{med['stage_shards'] / med['direct_shards']:.3f} (inside shards)")


if __name__ == "__main__":
    main()
