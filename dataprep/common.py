"""Small helpers shared by the stages: errors, failure reasons, files on any fsspec target."""

from __future__ import annotations

import json
import re
from typing import Any

import fsspec


class DataprepError(Exception):
    """A problem the user must fix (bad config, unreadable annotation file); printed, not traced."""


# Names the shard writers set themselves; a corpus column with one of these names is kept
# under "src_<name>" so it cannot overwrite what the stage measured (img2dataset refuses them too).
RESERVED_COLUMNS = frozenset(
    {
        "key", "caption", "url", "path", "status", "error_message", "width", "height",
        "original_width", "original_height", "exif", "md5", "sha256", "sha512", "source_key",
        "duration", "fps", "num_frames", "original_duration", "original_fps", "trimmed",
    }
)

_REASON_PATTERNS = [
    (re.compile(r"refused: (\w+)"), lambda m: f"refused: {m.group(1)}"),  # dataprep/urls.py
    (re.compile(r"HTTP Error (\d{3})"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed? ?out", re.I), lambda m: "timeout"),
    (re.compile(r"IncompleteRead|incomplete read|truncated download", re.I), lambda m: "truncated_download"),
    (re.compile(r"refused|reset by peer|Name or service not known|No route|urlopen error|"
                r"Remote end closed|unknown url type", re.I), lambda m: "connection_error"),
    (re.compile(r"No such file|not found on disk|FileNotFoundError", re.I), lambda m: "file_not_found"),
    (re.compile(r"Image decoding error|cannot identify image|not an image", re.I), lambda m: "not_an_image"),
    (re.compile(r"image too small", re.I), lambda m: "image_too_small"),
    (re.compile(r"image area too large", re.I), lambda m: "image_too_large"),
    (re.compile(r"aspect ratio too large", re.I), lambda m: "bad_aspect_ratio"),
    (re.compile(r"no video stream|not a video|Invalid data found", re.I), lambda m: "not_a_video"),
    (re.compile(r"video too long", re.I), lambda m: "video_too_long"),
    (re.compile(r"video too short|no frames decoded", re.I), lambda m: "video_too_short"),
    (re.compile(r"file too large", re.I), lambda m: "file_too_large"),
    (re.compile(r"decod", re.I), lambda m: "decode_error"),
]


def failure_reason(message: str | None) -> str:
    """Map a downloader's error message to a short, countable reason.

    Raw messages carry object addresses and URLs, so counting them directly would give one
    "reason" per sample.
    """
    if not message:
        return "unknown"
    for pattern, name in _REASON_PATTERNS:
        m = pattern.search(message)
        if m:
            return name(m)
    text = re.sub(r"0x[0-9a-fA-F]+|\d+", "N", message.strip().lower())
    return "other: " + text[:80]


# Failures worth asking again: the server or the network may answer next time (a 404 will not).
RETRIABLE = {"timeout", "connection_error", "truncated_download", "http_408", "http_429"}


def retriable(reason: str) -> bool:
    return reason in RETRIABLE or bool(re.fullmatch(r"http_5\d\d", reason))


def retriable_failures(stats: dict) -> int:
    """Rows of a shard (its _stats.json) that failed for a reason worth retrying."""
    return sum(n for message, n in stats.get("status_dict", {}).items()
               if message != "success" and retriable(failure_reason(message)))


def url_to_fs(url: str):
    return fsspec.core.url_to_fs(str(url))


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def records(df) -> list[dict]:
    """Table rows as plain Python values (no numpy scalars, NaN as None), ready for JSON."""
    return json.loads(df.to_json(orient="records", force_ascii=False))


def read_json(fs, path: str) -> Any:
    with fs.open(path, "r") as f:
        return json.load(f)


def dumps(obj: Any) -> str:
    """The one JSON layout every stage writes: stable, so re-running a stage changes no byte."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(fs, path: str, obj: Any) -> bool:
    """Write atomically (temp name, then rename); skip when identical. Returns True if written."""
    text = dumps(obj)
    if fs.exists(path):
        with fs.open(path, "r") as f:
            if f.read() == text:
                return False
    tmp = path + ".tmp"
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.mv(tmp, path)
    return True
