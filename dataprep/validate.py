"""Validate + index: open every shard, decode every sample, write sizes.json, invalid.json and report.json.

sizes.json ({"00000.tar": n, ...}) is what the trainer's loader reads: it lists the shards that
are complete and intact, each with its number of decodable samples. report.json is the corpus's
account: attempted, succeeded, failed by reason, bytes, durations, and the shards flagged as
truncated, incomplete or empty. Both are written only when their content changes, so validating a
finished corpus twice changes nothing.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

from .common import failure_reason, join, read_json, url_to_fs, write_json
from .shards import shards_to_retry

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
STORED_FRAME = re.compile(r"^frame(\d+)\.(?:jpg|jpeg|png|webp)$")  # a video sample's frames (dataprep/videos.py)
TAR_RE = re.compile(r"^(\d+)\.tar$")
STATS_RE = re.compile(r"^(\d+)_stats\.json$")
ANNOTATIONS_REPORT = "_prep/annotations.json"
# Flags that make a shard unreadable or unfinished: it is kept out of sizes.json.
BLOCKING = ("truncated", "incomplete", "unreadable")


@dataclass
class ShardCheck:
    name: str
    valid: int = 0
    invalid: Counter = field(default_factory=Counter)
    flags: list[str] = field(default_factory=list)
    bytes: int = 0
    video_seconds: float = 0.0
    images: int = 0
    videos: int = 0
    invalid_at: list[int] = field(default_factory=list)  # positions of the stored samples not counted valid


def _split_key(member_name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    directory, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def tar_samples(fs, path: str):
    """(key, {extension: bytes}) per sample of a tar, in order, webdataset's grouping.

    A tar cut off raises (tarfile.TarError, EOFError, OSError) once the samples before the cut have
    been yielded: the sample being read then is lost, and the caller counts it.
    """
    current, files = None, {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile() or "." not in member.name.rsplit("/", 1)[-1]:
                continue  # no extension: not part of any sample (webdataset's rule; readers skip it too)
            key, ext = _split_key(member.name)
            if key != current:
                if current is not None:
                    yield current, files
                current, files = key, {}
            files[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current, files


def _decode_video(data: bytes) -> float:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        rate = float(stream.average_rate or stream.guessed_rate or 0)
    if frames == 0:
        raise ValueError("no frames")
    return frames / rate if rate else 0.0


MAX_PIXELS = 40_000_000  # as the trainer's data.max_image_pixels: larger images count as invalid, undecoded


def _image_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size[0] * img.size[1] > MAX_PIXELS:  # from the header: a decompression bomb is not decoded
                return False
            img.load()
    except Exception:  # noqa: BLE001 - PIL raises many types for bad data
        return False
    return True


def _check_stored_frames(files: dict[str, bytes], decode: bool) -> str | None:
    """A video sample's stored frames must be numbered 0..K-1 and (with `decode`) decode."""
    frames = {int(m.group(1)): e for e in files if (m := STORED_FRAME.match(e))}
    if sorted(frames) != list(range(len(frames))):
        return "stored frames not numbered 0..K-1"
    if decode:
        if not all(_image_decodes(files[e]) for e in frames.values()):
            return "undecodable stored frame"
    return None


def _check_sample(files: dict[str, bytes], decode: bool, check: ShardCheck) -> str | None:
    """None if the sample is good, else why not. Updates the shard's media counters."""
    media = [e for e in files if e in IMAGE_EXTS or e in VIDEO_EXTS]
    if not media:
        return "no image or video"
    if "txt" not in files:
        return "missing caption"
    try:
        caption = files["txt"].decode("utf-8")
    except UnicodeDecodeError:
        return "caption not utf-8"
    if not caption.strip():
        return "empty caption"
    if "json" not in files:
        return "missing json"
    try:
        json.loads(files["json"])
    except ValueError:
        return "bad json"
    ext = media[0]
    if ext in IMAGE_EXTS:
        if decode and not _image_decodes(files[ext]):
            return "undecodable image"
        check.images += 1
    else:
        if decode:
            try:
                check.video_seconds += _decode_video(files[ext])
            except Exception:  # noqa: BLE001 - as above, for PyAV
                return "undecodable video"
        problem = _check_stored_frames(files, decode)
        if problem:
            return problem
        check.videos += 1
    return None


def _tail_is_intact(fs, path: str, size: int) -> bool:
    """A complete tar ends with two zero blocks and is a whole number of 512-byte blocks."""
    if size < 1024 or size % 512:
        return False
    with fs.open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def check_tar(fs, path: str, decode: bool = True) -> ShardCheck:
    check = ShardCheck(path.rsplit("/", 1)[-1])
    check.bytes = fs.size(path)
    if not _tail_is_intact(fs, path, check.bytes):
        check.flags.append("truncated")
    seen: set[str] = set()
    try:
        for position, (key, files) in enumerate(tar_samples(fs, path)):
            problem = "duplicate key" if key in seen else _check_sample(files, decode, check)
            seen.add(key)
            if problem:
                check.invalid[problem] += 1
                check.invalid_at.append(position)
            else:
                check.valid += 1
    except (tarfile.TarError, EOFError, OSError) as err:
        # The sample being read when the data ran out is lost; the ones before it are counted.
        check.invalid["cut off by end of data"] += 1
        if "truncated" not in check.flags:
            check.flags.append(f"unreadable: {err}")
    return check


def _normalise_message(message: str) -> str:
    return re.sub(r"0x[0-9a-fA-F]+", "0x…", str(message))


def validate(output_dir: str, decode: bool = True, workers: int = 2, min_success: float = 0.0,
             retry_rounds: int | None = None) -> dict:
    """Check every shard in `output_dir`; write sizes.json, invalid.json and report.json; return the report.

    Not ok (besides broken shards): a shard whose share of downloaded rows is below `min_success`,
    and, with `retry_rounds`, rows that failed for a reason worth retrying that the next download
    would still retry."""
    fs, root = url_to_fs(output_dir)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) if fs.exists(root) else []
    tars = [n for n in names if TAR_RE.match(n)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        checks = list(tqdm(pool.map(lambda n: check_tar(fs, join(root, n), decode), tars),
                           total=len(tars), desc="validate", unit="shard", dynamic_ncols=True))
    stats = {STATS_RE.match(n).group(1): read_json(fs, join(root, n)) for n in names if STATS_RE.match(n)}
    errors, warnings = _shard_problems(checks, stats, [n for n in names if n.endswith(".tmp")])
    rates = {f"{sid}.tar": (s["successes"] / s["count"] if s["count"] else 1.0) for sid, s in sorted(stats.items())}
    retry = shards_to_retry(output_dir, retry_rounds) if retry_rounds is not None else {}
    annotations = read_json(fs, join(root, ANNOTATIONS_REPORT)) if fs.exists(join(root, ANNOTATIONS_REPORT)) else None
    errors += _download_problems(stats, rates, min_success, retry, annotations)
    sizes = {c.name: c.valid for c in checks if c.valid > 0 and not any(f.startswith(BLOCKING) for f in c.flags)}
    downloads, samples = _download_account(stats), _sample_account(checks, decode)
    byte_counts = {"shards": samples.pop("shard_bytes"), "downloaded": downloads.pop("downloaded_bytes")}
    report = {"output_dir": str(output_dir), "modality": samples.pop("modality"), "annotations": annotations,
              **downloads, "samples": samples.pop("samples"), "bytes": byte_counts, **samples,
              "shards": {"total": len(tars), "indexed": len(sizes),
                         "flagged": {c.name: c.flags for c in checks if c.flags}, "success_rate": rates},
              "retriable_failures": sum(retry.values()), "errors": errors, "warnings": warnings, "ok": not errors}
    if fs.exists(root):
        # invalid.json: where indexed shards store samples that do not decode, so that readers reach
        # every valid sample at its place (sizes.json counts the valid ones only)
        write_json(fs, join(root, "invalid.json"), {c.name: c.invalid_at for c in checks if c.name in sizes and c.invalid_at})
        write_json(fs, join(root, "sizes.json"), sizes)
        write_json(fs, join(root, "report.json"), report)
    return report


def _shard_problems(checks: list[ShardCheck], stats: dict, leftovers: list[str]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of the shards themselves: unfinished, truncated, counts that disagree, empty."""
    errors, warnings = [], []
    for check in checks:
        shard_stats = stats.get(check.name[: -len(".tar")])
        if shard_stats is None:
            check.flags.append("incomplete: no _stats.json (interrupted download; run it again)")
        elif shard_stats["successes"] != check.valid and not any(f.startswith(BLOCKING) for f in check.flags):
            check.flags.append(f"count mismatch: stats say {shard_stats['successes']} successes, "
                               f"{check.valid} samples decode")
        if check.valid == 0:
            check.flags.append("empty")
    for shard_id in sorted(set(stats) - {c.name[: -len('.tar')] for c in checks}):
        errors.append(f"{shard_id}.tar missing although {shard_id}_stats.json exists")
    for check in checks:
        for flag in check.flags:
            (errors if flag.startswith(BLOCKING) else warnings).append(f"{check.name}: {flag}")
    if leftovers:
        errors.append(f"temporary files of an interrupted run: {leftovers} (run the download again)")
    return errors, warnings


def _download_problems(stats: dict, rates: dict, min_success: float, retry: dict, annotations) -> list[str]:
    """Errors of the download: shards below min_success, failures still to retry, rows not attempted."""
    errors = []
    low = {name: rate for name, rate in rates.items() if rate < min_success}
    if low:
        errors.append(f"{len(low)} shard(s) below min_success={min_success}: "
                      + ", ".join(f"{n} {100 * r:.1f}%" for n, r in sorted(low.items(), key=lambda kv: kv[1])[:10]))
    if retry:
        errors.append(f"{sum(retry.values())} rows of {len(retry)} shard(s) failed for a reason worth retrying "
                      "(timeout, connection, 5xx, 408, 429): run the download again")
    attempted = sum(s["count"] for s in stats.values())
    if annotations is not None and attempted < annotations["rows_kept"]:
        errors.append(f"only {attempted} of {annotations['rows_kept']} annotation rows were attempted "
                      "(download unfinished; run it again)")
    return errors


def _download_account(stats: dict) -> dict:
    """What the shards' _stats.json say: attempts, successes, failures by reason, bytes, time."""
    failed_by_reason, messages = Counter(), Counter()
    for s in stats.values():
        for message, n in s.get("status_dict", {}).items():
            if message != "success":
                failed_by_reason[failure_reason(message)] += n
                messages[_normalise_message(message)] += n
    downloaded = [s["bytes_downloaded"] for s in stats.values() if "bytes_downloaded" in s]
    return {
        "attempted": sum(s["count"] for s in stats.values()),
        "succeeded": sum(s["successes"] for s in stats.values()),
        "failed_to_download": sum(s["failed_to_download"] for s in stats.values()),
        "failed_to_resize": sum(s["failed_to_resize"] for s in stats.values()),
        "failed_by_reason": dict(sorted(failed_by_reason.items())),
        "error_messages": dict(messages.most_common(20)),
        "downloaded_bytes": sum(downloaded) if downloaded else None,
        "duration_s": round(sum(s["duration"] for s in stats.values()), 3),
        "wall_s": round(max((s["end_time"] for s in stats.values()), default=0)
                        - min((s["start_time"] for s in stats.values()), default=0), 3),
    }


def _sample_account(checks: list[ShardCheck], decode: bool) -> dict:
    """What reading the shards found: valid and invalid samples, media kinds, bytes, video seconds."""
    invalid = sum((c.invalid for c in checks), Counter())
    n_images, n_videos = sum(c.images for c in checks), sum(c.videos for c in checks)
    return {"modality": "video" if n_videos > n_images else "image",
            "samples": {"valid": sum(c.valid for c in checks), "invalid": dict(sorted(invalid.items())),
                        "decoded": decode},
            "shard_bytes": sum(c.bytes for c in checks),
            "video_seconds": round(sum(c.video_seconds for c in checks), 3)}
