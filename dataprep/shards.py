"""Writing shards in img2dataset / video2dataset's format, for the stages that are not img2dataset.

Layout of an output folder, one triple per shard:
    00000.tar           <key>.<ext> + <key>.txt + <key>.json per successful sample
    00000.parquet       one row per attempted sample (status, error_message, metadata)
    00000_stats.json    count, successes, failed_to_download, failed_to_resize, status_dict, ...
A shard is finished when its _stats.json exists (img2dataset's rule for incremental runs). The tar
and parquet are written under a temporary name and renamed, and the stats come last, so an
interrupted run leaves no truncated tar and a re-run redoes exactly the unfinished shards.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .common import join, read_json, retriable_failures, url_to_fs, write_json

STATS_RE = re.compile(r"^(\d+)_stats\.json$")


def shard_name(shard_id: int, oom_shard_count: int = 5) -> str:
    return f"{shard_id:0{oom_shard_count}d}"


def sample_key(index: int, shard_id: int, shard_size: int, oom_shard_count: int = 5) -> str:
    """img2dataset's key: shard id then the index in the shard, zero-padded."""
    oom_sample = math.ceil(math.log10(shard_size))
    return f"{shard_id * 10 ** oom_sample + index:0{oom_sample + oom_shard_count}d}"


def finished_shards(output_dir: str) -> set[int]:
    fs, path = url_to_fs(output_dir)
    if not fs.exists(path):
        return set()
    names = (p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return {int(m.group(1)) for m in map(STATS_RE.match, names) if m}


SHARD_FILE_RE = re.compile(r"^(\d+)(\.tar|\.parquet|_stats\.json)(\.tmp)?$")  # group 1: the shard id
RETRIES = "_prep/retries.json"  # {shard id: times its retriable failures were retried}


def retry_rounds(output_dir: str) -> dict[int, int]:
    fs, path = url_to_fs(output_dir)
    file = join(path, RETRIES)
    return {int(k): v for k, v in read_json(fs, file).items()} if fs.exists(file) else {}


def shards_to_retry(output_dir: str, max_rounds: int) -> dict[int, int]:
    """{shard id: retriable failures} of the finished shards whose rows failed for a reason worth
    asking again (timeouts, refused or reset connections, 5xx, 408, 429), retried fewer than
    `max_rounds` times."""
    fs, path = url_to_fs(output_dir)
    if not fs.exists(path):
        return {}
    rounds, out = retry_rounds(output_dir), {}
    for name in fs.ls(path, detail=False):
        m = STATS_RE.match(name.rsplit("/", 1)[-1])
        if m and rounds.get(int(m.group(1)), 0) < max_rounds:
            n = retriable_failures(read_json(fs, name))
            if n:
                out[int(m.group(1))] = n
    return out


def reopen_shards(output_dir: str, shard_ids) -> None:
    """Remove these shards' files so that the next download writes them again, and count the round."""
    fs, path = url_to_fs(output_dir)
    ids = set(shard_ids)
    for p in fs.ls(path, detail=False):
        m = SHARD_FILE_RE.match(p.rsplit("/", 1)[-1])
        if m and int(m.group(1)) in ids:
            fs.rm(p)
    rounds = retry_rounds(output_dir)
    for i in ids:
        rounds[i] = rounds.get(i, 0) + 1
    write_json(fs, join(path, RETRIES), {str(k): v for k, v in sorted(rounds.items())})


def remove_shards(output_dir: str) -> int:
    """Delete every shard file (tar, parquet, stats, their temporaries) for a fresh start."""
    fs, path = url_to_fs(output_dir)
    if not fs.exists(path):
        return 0
    doomed = [p for p in fs.ls(path, detail=False) if SHARD_FILE_RE.match(p.rsplit("/", 1)[-1])]
    for p in doomed:
        fs.rm(p)
    return len(doomed)


@dataclass
class SampleResult:
    """What processing one annotation row gave."""

    status: str  # "success", "failed_to_download" or "failed_to_resize" (img2dataset's names)
    streams: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes, e.g. {"mp4": ...}
    meta: dict = field(default_factory=dict)  # measured fields added to the sample's json
    error_message: str | None = None
    bytes_downloaded: int = 0


class ShardWriter:
    """One shard's tar + parquet, under temporary names until `close`."""

    def __init__(self, output_dir: str, shard_id: int, oom_shard_count: int = 5):
        self.fs, self.dir = url_to_fs(output_dir)
        self.name = shard_name(shard_id, oom_shard_count)
        self.tar_path = join(self.dir, f"{self.name}.tar")
        self._tar_fd = self.fs.open(self.tar_path + ".tmp", "wb")
        # Plain tarfile, laid out as webdataset's TarWriter does (members sorted by extension),
        # so that the CLI does not import webdataset and, through it, torch.
        self._tar = tarfile.open(fileobj=self._tar_fd, mode="w|")
        self._rows: list[dict] = []

    def write(self, key: str, caption: str, meta: dict, streams: dict[str, bytes]) -> None:
        if streams:
            # indent=4, as img2dataset writes it.
            members = {**streams, "txt": caption.encode("utf-8"), "json": json.dumps(meta, indent=4).encode("utf-8")}
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), time.time(), 0o444
                info.uname = info.gname = "bigdata"
                self._tar.addfile(info, io.BytesIO(members[ext]))
        self._rows.append(meta)

    def close(self, stats: dict) -> None:
        self._tar.close()
        self._tar_fd.close()
        parquet_path = join(self.dir, f"{self.name}.parquet")
        with self.fs.open(parquet_path + ".tmp", "wb") as f:
            pq.write_table(pa.Table.from_pylist(self._rows), f)
        self.fs.mv(parquet_path + ".tmp", parquet_path)
        self.fs.mv(self.tar_path + ".tmp", self.tar_path)
        with self.fs.open(join(self.dir, f"{self.name}_stats.json.tmp"), "w") as f:
            json.dump(stats, f, indent=4)
        self.fs.mv(join(self.dir, f"{self.name}_stats.json.tmp"), join(self.dir, f"{self.name}_stats.json"))

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # only to release the stream: the file is deleted
            self._tar.close()
        self._tar_fd.close()
        if self.fs.exists(self.tar_path + ".tmp"):
            self.fs.rm(self.tar_path + ".tmp")


@dataclass
class ShardJob:
    shard_id: int
    rows: list[dict]  # annotation rows: url|path, caption, key, source, extra columns
    output_dir: str
    shard_size: int
    threads: int
    oom_shard_count: int = 5


def run_shard(job: ShardJob, process: Callable[[dict], SampleResult],
              progress: Callable[[int], None] | None = None) -> dict:
    """Process one shard's rows with `threads` threads and write it; returns its stats."""
    start = time.time()
    writer = ShardWriter(job.output_dir, job.shard_id, job.oom_shard_count)
    status_dict: Counter = Counter()
    counts = Counter()
    bytes_downloaded = 0
    pool = ThreadPoolExecutor(max(1, job.threads))
    try:
        results = _ordered_map(pool, _safe(process), job.rows, window=4 * max(1, job.threads))
        for index, (row, result) in enumerate(zip(job.rows, results)):
            key = sample_key(index, job.shard_id, job.shard_size, job.oom_shard_count)
            meta = {**{k: v for k, v in row.items() if k != "key"}, "source_key": row["key"],
                    "key": key, "status": result.status, "error_message": result.error_message,
                    **result.meta}
            counts[result.status] += 1
            status_dict[result.status if result.status == "success" else result.error_message] += 1
            bytes_downloaded += result.bytes_downloaded
            writer.write(key, row["caption"], meta, result.streams if result.status == "success" else {})
            if progress:
                progress(1)
    except BaseException:
        writer.abort()
        raise
    finally:
        # On Ctrl-C, drop the queued samples instead of waiting for them.
        pool.shutdown(wait=False, cancel_futures=True)
    end = time.time()
    stats = {
        "count": len(job.rows),
        "successes": counts["success"],
        "failed_to_download": counts["failed_to_download"],
        "failed_to_resize": counts["failed_to_resize"],
        "duration": end - start,
        "bytes_downloaded": bytes_downloaded,
        "start_time": start,
        "end_time": end,
        "status_dict": dict(status_dict),
    }
    writer.close(stats)
    return stats


def _ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: list, window: int) -> Iterator:
    """pool.map in input order (so a re-run writes the same tar), with at most `window` samples in
    flight: finished clips wait for a slow one in memory, and that memory stays bounded."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _safe(process: Callable[[dict], SampleResult]) -> Callable[[dict], SampleResult]:
    """A bug or an unexpected library error on one sample is that sample's failure, not the run's."""

    def wrapped(row: dict) -> SampleResult:
        try:
            return process(row)
        except Exception as err:  # noqa: BLE001 - counted per reason in the stats
            return SampleResult("failed_to_resize", error_message=f"{type(err).__name__}: {err}")

    return wrapped


def _run_shard_in_process(args) -> dict:
    job, process = args
    return run_shard(job, process)


def plan_jobs(rows: list[dict], output_dir: str, shard_size: int, threads: int) -> list[ShardJob]:
    """Split rows into shards of `shard_size`, leaving out the finished ones."""
    done = finished_shards(output_dir)
    return [ShardJob(i, rows[i * shard_size:(i + 1) * shard_size], output_dir, shard_size, threads)
            for i in range(math.ceil(len(rows) / shard_size)) if i not in done]


def run_jobs(jobs: Iterable[ShardJob], process: Callable[[dict], SampleResult], processes: int = 1,
             desc: str = "samples") -> list[dict]:
    """Run shard jobs, in this process (threads only) or spread over `processes` processes."""
    jobs = list(jobs)
    total = sum(len(j.rows) for j in jobs)
    results = []
    with tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True) as bar:
        if processes <= 1:
            for job in jobs:
                results.append(run_shard(job, process, bar.update))
        else:
            with ProcessPoolExecutor(processes) as pool:
                for job, stats in zip(jobs, pool.map(_run_shard_in_process, [(j, process) for j in jobs])):
                    results.append(stats)
                    bar.update(len(job.rows))
    return results
