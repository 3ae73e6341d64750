"""The stages, each runnable on its own and re-runnable: annotations -> download -> validate.

Files in a corpus's output folder:
    _prep/annotations.parquet   the normalised table (url|path, caption, key, source, extras)
    _prep/annotations.json      what the reader kept and rejected, by reason
    00000.tar / .parquet / _stats.json ...   the shards (img2dataset / video2dataset format)
    sizes.json, report.json     written by validate
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections import Counter

import pandas as pd

from . import shapes, urls
from .common import DataprepError, failure_reason, join, read_json, records, url_to_fs, write_json
from .config import CorpusConfig
from .images import ImageOptions, LocalImageProcessor, clear_index, img2dataset_download
from .readers import read_corpus
from .serve import LoopbackServer
from .shards import STATS_RE, finished_shards, plan_jobs, remove_shards, reopen_shards, run_jobs, shards_to_retry
from .validate import validate
from .videos import VideoOptions, VideoProcessor

TABLE = "_prep/annotations.parquet"
TABLE_REPORT = "_prep/annotations.json"
SHARDS_FROM = "_prep/shards_from.json"


def _say(stage: str, cfg: CorpusConfig, text: str) -> None:
    print(f"[{stage} {cfg.name}] {text}", flush=True)


def annotations(cfg: CorpusConfig) -> dict:
    """Read the corpus's annotation file, normalise it, write the table and its report."""
    if not cfg.input:
        raise DataprepError(f"{cfg.name}: no input annotation file (set `input` or pass --input)")
    df, report = read_corpus(cfg.format, cfg.input, cfg.name, cfg.reader, cfg.url_template, cfg.path_template)
    if "url" in df.columns and not cfg.allow_private_urls:
        df, report = _refuse_unsafe_urls(cfg, df, report)
    fs, root = url_to_fs(cfg.output_dir)
    fs.makedirs(join(root, "_prep"), exist_ok=True)
    path = join(root, TABLE)
    with fs.open(path + ".tmp", "wb") as f:
        df.to_parquet(f, index=False)
    fs.mv(path + ".tmp", path)
    write_json(fs, join(root, TABLE_REPORT), report)
    rejected = ", ".join(f"{k}: {v}" for k, v in report["rejected"].items()) or "none"
    _say("annotations", cfg, f"{report['rows_read']} rows read, {report['rows_kept']} kept; "
                             f"rejected: {rejected} -> {path}")
    return report


def _refuse_unsafe_urls(cfg: CorpusConfig, df: pd.DataFrame, report: dict) -> tuple[pd.DataFrame, dict]:
    """Rows whose URL is a local file or a loopback, private or link-local address leave the table,
    counted per reason (dataprep/urls.py)."""
    reasons = urls.refuse_unsafe(df["url"].tolist(), cfg.threads)
    refused = urls.count(reasons)
    if not refused:
        return df, report
    df = df[[r is None for r in reasons]].reset_index(drop=True)
    report = {**report, "rows_kept": int(len(df)),
              "rejected": dict(sorted((Counter(report["rejected"]) + refused).items()))}
    _say("annotations", cfg, f"refused {sum(refused.values())} rows whose URL names a local file or a non-public "
                             f"address ({', '.join(f'{k[9:]}: {v}' for k, v in sorted(refused.items()))}); "
                             "allow_private_urls: true lets them through, for sources you trust")
    return df, report


def _image_options(cfg: CorpusConfig) -> ImageOptions:
    return ImageOptions(image_size=cfg.image_size, resize_mode=cfg.resize_mode, min_image_size=cfg.min_image_size,
                        max_aspect_ratio=cfg.max_aspect_ratio, encode_quality=cfg.encode_quality,
                        timeout=cfg.timeout, retries=cfg.retries, max_bytes=cfg.max_bytes,
                        allow_private_urls=cfg.allow_private_urls)


def _video_options(cfg: CorpusConfig) -> VideoOptions:
    return VideoOptions(video_size=cfg.video_size, resize_mode=cfg.video_resize_mode, fps=cfg.fps,
                        max_duration=cfg.max_duration, max_source_duration=cfg.max_source_duration,
                        timeout=cfg.timeout, retries=cfg.retries, max_bytes=cfg.max_bytes,
                        keyframe_interval=cfg.video_keyframe_interval, frames=cfg.video_frames,
                        frame_quality=cfg.video_frame_quality, allow_private_urls=cfg.allow_private_urls)


def download(cfg: CorpusConfig) -> dict:
    """Fetch, check and shard every row of the table; finished shards are kept as they are."""
    fs, root = url_to_fs(cfg.output_dir)
    if not fs.exists(join(root, TABLE)):
        raise DataprepError(f"{cfg.name}: no table at {join(root, TABLE)}; run the annotations stage first")
    with fs.open(join(root, TABLE), "rb") as f:
        df = pd.read_parquet(f)
    _check_table(cfg, df)
    n_shards = -(-len(df) // cfg.shard_size)
    retry = shards_to_retry(cfg.output_dir, cfg.retry_rounds)
    if retry:
        reopen_shards(cfg.output_dir, retry)
        _say("download", cfg, f"retrying {len(retry)} shard(s) whose {sum(retry.values())} rows failed for a reason "
                              f"worth asking again (retry_rounds={cfg.retry_rounds})")
    done_before = finished_shards(cfg.output_dir)
    todo = [i for i in range(n_shards) if i not in done_before]
    _say("download", cfg, f"{len(df)} rows in {n_shards} shards, {len(todo)} to do")
    if todo:
        clear_index(cfg.output_dir)
        with distributed(cfg) as spark_session:
            _write_shards(cfg, df, root, spark_session)
    summary = summarise(cfg.output_dir)
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["failed_by_reason"].items()) or "none"
    _say("download", cfg, f"{summary['shards']} shards; attempted {summary['attempted']}, "
                          f"succeeded {summary['succeeded']}, failed {summary['failed']} ({reasons}); "
                          f"{summary['duration_s']:.1f}s of work")
    return summary


@contextlib.contextmanager
def distributed(cfg: CorpusConfig):
    """The SparkSession the shards are written on (distributor: spark), else None."""
    if cfg.distributor != "spark":
        yield None
        return
    from . import spark

    with spark.session(cfg.spark_master, f"dataprep {cfg.name}") as session:
        yield session


def _write_shards(cfg: CorpusConfig, df: pd.DataFrame, root: str, spark_session) -> None:
    if cfg.modality == "image" and "url" in df.columns:
        _img2dataset(cfg, df, root, "pyspark" if spark_session else "multiprocessing")
        return
    processor = (VideoProcessor(_video_options(cfg)) if cfg.modality == "video"
                 else LocalImageProcessor(_image_options(cfg)))
    jobs = plan_jobs(records(df), cfg.output_dir, cfg.shard_size, cfg.threads)
    if spark_session is not None:
        from . import spark

        spark.run_jobs(spark_session, jobs, processor)
    else:
        run_jobs(jobs, processor, cfg.processes, desc=f"{cfg.name} {cfg.modality}s")


def table_fingerprint(df: pd.DataFrame) -> str:
    """Identifies the rows (location, caption, key), ignoring the URL's host: the same corpus served
    from a mirror, or from a loopback server on another port, is the same corpus."""
    loc = "url" if "url" in df.columns else "path"
    where = df[loc].astype(str).str.replace(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*", "", regex=True)
    hashed = pd.util.hash_pandas_object(pd.DataFrame({"loc": where, "caption": df["caption"], "key": df["key"]}),
                                        index=False)
    return hashlib.sha256(hashed.values.tobytes()).hexdigest()


def _check_table(cfg: CorpusConfig, df: pd.DataFrame) -> None:
    """Finished shards are reused only for the table they were made from."""
    fs, root = url_to_fs(cfg.output_dir)
    record = join(root, SHARDS_FROM)
    fingerprint = table_fingerprint(df)
    fresh = not cfg.incremental
    if (not fresh and finished_shards(cfg.output_dir) and fs.exists(record)
            and read_json(fs, record)["table"] != fingerprint):
        if cfg.table_changed != "fresh":
            raise DataprepError(f"{cfg.output_dir}: the annotation table changed since its shards were written; "
                                "run the download with --fresh to rebuild them")
        fresh = True
    if fresh:
        _say("download", cfg, f"fresh start: removed {remove_shards(cfg.output_dir)} shard files")
    write_json(fs, record, {"table": fingerprint, "rows": int(len(df))})


def _img2dataset(cfg: CorpusConfig, df: pd.DataFrame, root: str, distributor: str) -> None:
    # img2dataset reserves the column name "key" for its own sample keys.
    table = df.rename(columns={"key": "source_key"})
    extra = [c for c in table.columns if c not in ("url", "caption")]
    fs, _ = url_to_fs(cfg.output_dir)
    path = join(root, "_prep/img2dataset_input.parquet")
    with fs.open(path, "wb") as f:
        table.to_parquet(f, index=False)
    img2dataset_download(path, cfg.output_dir, _image_options(cfg), extra, cfg.shard_size, cfg.processes,
                         cfg.threads, distributor)


def summarise(output_dir: str) -> dict:
    """Totals over the finished shards' _stats.json files."""
    fs, root = url_to_fs(output_dir)
    stats = [read_json(fs, p) for p in fs.ls(root, detail=False) if STATS_RE.match(p.rsplit("/", 1)[-1])]
    reasons = Counter()
    for s in stats:
        for message, n in s.get("status_dict", {}).items():
            if message != "success":
                reasons[failure_reason(message)] += n
    return {
        "shards": len(stats),
        "attempted": sum(s["count"] for s in stats),
        "succeeded": sum(s["successes"] for s in stats),
        "failed": sum(s["failed_to_download"] + s["failed_to_resize"] for s in stats),
        "failed_by_reason": dict(sorted(reasons.items())),
        "duration_s": sum(s["duration"] for s in stats),
    }


def validate_stage(cfg: CorpusConfig, decode: bool = True) -> dict:
    report = validate(cfg.output_dir, decode=decode, workers=max(1, cfg.processes), min_success=cfg.min_success,
                      retry_rounds=cfg.retry_rounds)
    rates = report["shards"]["success_rate"]
    shown = sorted(rates.items(), key=lambda kv: kv[1])[:20]
    for name, rate in shown:
        _say("validate", cfg, f"{name}: {100 * rate:.1f}% of its rows downloaded")
    if len(rates) > len(shown):
        _say("validate", cfg, f"... {len(rates) - len(shown)} more shards, all at or above "
                              f"{100 * shown[-1][1]:.1f}% (each shard's rate: report.json)")
    status = "ok" if report["ok"] else "PROBLEMS"
    _say("validate", cfg, f"{status}: {report['samples']['valid']} valid samples in "
                          f"{report['shards']['indexed']}/{report['shards']['total']} indexed shards, "
                          f"{report['bytes']['shards'] / 1e6:.1f} MB -> {join(cfg.output_dir, 'sizes.json')}")
    for line in report["errors"]:
        _say("validate", cfg, f"error: {line}")
    for line in report["warnings"]:
        _say("validate", cfg, f"warning: {line}")
    return report


def splits(cfg: CorpusConfig) -> dict[str, CorpusConfig]:
    """The corpus and, where configured, its held-out split (same settings, own files)."""
    out = {"train": cfg}
    if cfg.eval_input and cfg.eval_output_dir:
        out["eval"] = dataclasses.replace(cfg, input=cfg.eval_input, output_dir=cfg.eval_output_dir,
                                          reader={**cfg.reader, **cfg.eval_reader})
    return out


@contextlib.contextmanager
def synthetic_source(cfg: CorpusConfig):
    """For the embedded default: generate the files and serve them on loopback while the stages run."""
    if not cfg.synthetic:
        yield None
        return
    params = dict(cfg.synthetic)
    root = params.pop("root")
    fs, _ = url_to_fs(root)
    fs.makedirs(root, exist_ok=True)
    with LoopbackServer(root) as server:
        paths = shapes.generate(root, base_url=server.url, **params)
        _say("synthetic", cfg, f"{root} served at {server.url}")
        yield paths


def run_splits(cfg: CorpusConfig, decode: bool = True) -> dict:
    """annotations -> download -> validate for the corpus and its eval split; {split: report}."""
    reports = {}
    for split, split_cfg in splits(cfg).items():
        _say("run", cfg, f"{split} split -> {split_cfg.output_dir}")
        annotations(split_cfg)
        download(split_cfg)
        reports[split] = validate_stage(split_cfg, decode)
    return reports


def run(cfg: CorpusConfig, decode: bool = True) -> dict:
    """Every stage; a synthetic corpus is generated and served on loopback meanwhile."""
    with synthetic_source(cfg), distributed(cfg):
        return run_splits(cfg, decode)
