"""The video download stage: video2dataset's output format, img2dataset's guarantees, PyAV's decoder.

video2dataset itself is not used: its releases pin an old torch, and it has stored an HTTP error
page as a "successful" mp4. Here every clip is fetched (HTTP with timeout and retries, or a local
path), decoded frame by frame, trimmed to `max_duration`, resampled to `fps`, resized, re-encoded
to H.264 and decoded once more before it counts as a success. Audio is dropped: the models here
read frames only.

What the loader pays per clip decides how many cores feed a GPU, so the stage writes for cheap
reading: a keyframe every `keyframe_interval` frames and no B-frames (any frame is a few decodes
from a seek point), and `frames` JPEGs of the clip beside it (`<key>.frame00.jpg` ...: the middle
frame of each of K equal segments), which the loader reads instead of the clip when present.

Shards written before stored frames existed get them without downloading again:
    python -m dataprep.videos add-frames OLD_DIR NEW_DIR [--frames 8] [--threads 4]
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

from tqdm import tqdm

from .common import join, read_json, url_to_fs
from .fetch import fetch
from .shards import SampleResult, ShardWriter, _ordered_map, finished_shards
from .validate import STORED_FRAME, TAR_RE, VIDEO_EXTS, tar_samples, validate


class VideoError(Exception):
    """The bytes are not a usable video; the message says why (it becomes the failure reason)."""


@dataclass
class VideoOptions:
    video_size: int = 224  # shorter side after resizing; never upscaled in keep_ratio mode
    resize_mode: str = "keep_ratio"  # or "center_crop": a video_size x video_size square
    fps: float | None = 8.0  # output frame rate, never above the source's; None keeps the source's
    max_duration: float = 10.0  # longer clips are trimmed to their first max_duration seconds
    max_source_duration: float | None = None  # longer sources are rejected as "video too long"
    timeout: float = 30.0
    retries: int = 2
    max_bytes: int = 512 << 20
    allow_private_urls: bool = False
    crf: int = 23
    keyframe_interval: int | None = 4  # frames from one keyframe to the next, no B-frames; None: x264's own GOP
    frames: int = 8  # JPEG frames stored beside the clip (fewer for shorter clips); 0: the clip only
    frame_quality: int = 90

    def __post_init__(self):
        if self.resize_mode not in ("keep_ratio", "center_crop"):
            raise ValueError(f"video resize_mode must be keep_ratio or center_crop, not {self.resize_mode!r}")
        if self.keyframe_interval is not None and self.keyframe_interval < 1:
            raise ValueError(f"keyframe_interval must be >= 1 or None, not {self.keyframe_interval}")
        if not 0 <= self.frames <= 99:
            raise ValueError(f"frames must be within 0..99 (two-digit member names), not {self.frames}")
        if not 1 <= self.frame_quality <= 100:
            raise ValueError(f"frame_quality must be within 1..100, not {self.frame_quality}")


def frame_member(i: int) -> str:
    """The tar member (extension) of stored frame i: frame00.jpg, frame01.jpg, ..."""
    return f"frame{i:02d}.jpg"


def segment_middles(num_frames: int, k: int) -> list[int]:
    """The middle frame of each of k equal segments (all frames when there are fewer than k); the
    loader's evaluation rule, so that stored frames are the ones it would pick from the clip."""
    k = min(k, num_frames)
    return [min(num_frames - 1, int((i + 0.5) * num_frames / k)) for i in range(k)]


def _encoder_options(opts: VideoOptions) -> dict:
    options = {"crf": str(opts.crf), "preset": "veryfast", "threads": "1"}
    if opts.keyframe_interval is not None:
        # A short GOP without B-frames: reaching a frame costs at most keyframe_interval decodes.
        options.update(g=str(opts.keyframe_interval), bf="0")
    return options


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def _output_size(width: int, height: int, opts: VideoOptions) -> tuple[int, int, int, int]:
    """(scaled width, scaled height, final width, final height)."""
    short = min(width, height)
    if opts.resize_mode == "center_crop":
        scale = opts.video_size / short
        sw, sh = max(opts.video_size, round(width * scale)), max(opts.video_size, round(height * scale))
        return sw, sh, _even(opts.video_size), _even(opts.video_size)
    scale = min(1.0, opts.video_size / short)
    return _even(width * scale), _even(height * scale), _even(width * scale), _even(height * scale)


def _source_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def transcode(data: bytes, opts: VideoOptions) -> tuple[dict[str, bytes], dict]:
    """Decode, trim, resample, resize and re-encode one video.

    Returns the sample's media members ({"mp4": ..., "frame00.jpg": ..., ...}) and its metadata.
    """
    import av  # heavy; imported where videos are handled

    try:
        source = av.open(io.BytesIO(data))
    except av.error.FFmpegError as err:
        raise VideoError(f"not a video: {err}") from err
    with source:
        stream, probe = _probe(source, opts)
        mp4, n_out, trimmed = _encode(source, stream, probe, opts)
    wanted = segment_middles(n_out, opts.frames) if opts.frames else []
    checked, frames = _check_and_sample(mp4, wanted, opts.frame_quality)
    if checked != n_out:
        raise VideoError(f"decoding error: re-encoded clip has {checked} of {n_out} frames")
    meta = {"duration": n_out / float(probe["out_fps"]), "fps": float(probe["out_fps"]), "num_frames": n_out,
            "width": probe["size"][2], "height": probe["size"][3], "original_width": probe["width"],
            "original_height": probe["height"], "original_fps": probe["src_fps"],
            "original_duration": probe["src_duration"], "trimmed": trimmed, "keyframe_interval": opts.keyframe_interval}
    if frames:
        meta["frame_indices"] = wanted
    return {"mp4": mp4, **{frame_member(i): jpg for i, jpg in enumerate(frames)}}, meta


def _probe(source, opts: VideoOptions):
    """The video stream and what the output follows from it: frame rates, duration, sizes; a
    VideoError for what is not a clip (a still image, a source over max_source_duration)."""
    # FFmpeg also opens still images as one-frame videos; a caption for a still is not a clip's.
    if not source.streams.video or source.format.name.endswith("_pipe") or source.format.name == "image2":
        raise VideoError(f"no video stream (format {source.format.name})")
    stream = source.streams.video[0]
    src_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    src_duration = _source_duration(source, stream)
    if opts.max_source_duration and src_duration and src_duration > opts.max_source_duration:
        raise VideoError(f"video too long: {src_duration:.1f}s > {opts.max_source_duration}s")
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise VideoError("no video stream: zero frame size")
    out_fps = Fraction(min(opts.fps, src_fps) if opts.fps else src_fps).limit_denominator(1001)
    return stream, {"src_fps": src_fps, "src_duration": src_duration, "out_fps": out_fps, "width": width,
                    "height": height, "size": _output_size(width, height, opts)}


def _encode(source, stream, probe: dict, opts: VideoOptions) -> tuple[bytes, int, bool]:
    """Re-encode up to max_duration at the output rate and size (scaled, centre-cropped): (mp4 bytes,
    frames written, whether the source was longer)."""
    import av

    sw, sh, ow, oh = probe["size"]
    src_fps, out_fps = probe["src_fps"], probe["out_fps"]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as sink:
        out = sink.add_stream("libx264", rate=out_fps)
        out.width, out.height, out.pix_fmt = ow, oh, "yuv420p"
        out.options = _encoder_options(opts)
        n_out, t0, trimmed, tolerance = 0, None, False, 0.5 / src_fps
        try:
            for index, frame in enumerate(source.decode(stream)):
                t = frame.time if frame.time is not None else index / src_fps
                t0 = t if t0 is None else t0
                if t - t0 >= opts.max_duration - 1e-6:
                    trimmed = True
                    break
                if t - t0 + tolerance < n_out / out_fps:
                    continue  # dropped to lower the frame rate
                out_frame = _resized(frame, (sw, sh), (ow, oh))
                out_frame.pts, out_frame.time_base = n_out, 1 / out_fps
                for packet in out.encode(out_frame):
                    sink.mux(packet)
                n_out += 1
        except av.error.FFmpegError as err:
            raise VideoError(f"decoding error after {n_out} frames: {err}") from err
        if n_out == 0:
            raise VideoError("video too short: no frames decoded")
        for packet in out.encode():
            sink.mux(packet)
    return buffer.getvalue(), n_out, trimmed


def _resized(frame, scaled: tuple[int, int], out: tuple[int, int]):
    """A frame scaled to `scaled` and centre-cropped to `out` (yuv420p when no crop is needed)."""
    import av

    crop = scaled != out
    resized = frame.reformat(width=scaled[0], height=scaled[1], format="rgb24" if crop else "yuv420p")
    if not crop:
        return resized
    x, y = (scaled[0] - out[0]) // 2, (scaled[1] - out[1]) // 2
    return av.VideoFrame.from_ndarray(resized.to_ndarray()[y:y + out[1], x:x + out[0]], format="rgb24")


def _check_and_sample(mp4: bytes, wanted: list[int], quality: int) -> tuple[int, list[bytes]]:
    """Decode the re-encoded clip once: its frame count, and the `wanted` frames as JPEGs (in order)."""
    import av

    picked, count = {}, 0
    with av.open(io.BytesIO(mp4)) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in wanted:
                buf = io.BytesIO()
                frame.to_image(threads=1).save(buf, format="JPEG", quality=quality)
                picked[index] = buf.getvalue()
            count = index + 1
    return count, [picked[i] for i in wanted if i in picked]


class VideoProcessor:
    """One annotation row -> a SampleResult; picklable, so shards can go to other processes."""

    def __init__(self, opts: VideoOptions):
        self.opts = opts

    def __call__(self, row: dict) -> SampleResult:
        data, error = fetch(row, self.opts.timeout, self.opts.retries, self.opts.max_bytes, self.opts.allow_private_urls)
        if data is None:
            return SampleResult("failed_to_download", error_message=error)
        try:
            streams, meta = transcode(data, self.opts)
        except VideoError as err:
            return SampleResult("failed_to_resize", error_message=str(err), bytes_downloaded=len(data))
        return SampleResult("success", streams, meta, bytes_downloaded=len(data))


# ---- stored frames for shards written without them ----

def add_frames(data: bytes, opts: VideoOptions) -> tuple[dict[str, bytes], dict]:
    """An existing clip's stored frames, the clip left as it is: the frame members and the json fields."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            n = sum(1 for p in container.demux(stream) if p.size)  # a cheap first count: no decoding
        wanted = segment_middles(n, opts.frames) if n else []
        count, frames = _check_and_sample(data, wanted, opts.frame_quality)
        if count != n:  # the packets miscounted the frames: pick again from the decoded count
            wanted = segment_middles(count, opts.frames) if count else []
            count, frames = _check_and_sample(data, wanted, opts.frame_quality)
    except (av.error.FFmpegError, IndexError) as err:
        raise VideoError(f"undecodable video: {err}") from err
    if not frames:
        raise VideoError("video too short: no frames decoded")
    return {frame_member(i): jpg for i, jpg in enumerate(frames)}, {"frame_indices": wanted}


def _tar_samples(fs, path: str, problems: Counter):
    """validate.tar_samples, a tar cut off ending the shard: the sample being read is lost and
    counted in `problems`."""
    try:
        yield from tar_samples(fs, path)
    except (tarfile.TarError, EOFError, OSError) as err:
        problems[f"source tar cut off: {err}"] += 1


def _sample_with_frames(item: tuple[str, dict], opts: VideoOptions) -> tuple[str, str, dict, dict, str | None]:
    """(key, caption, media members, json, error): the sample with stored frames, or why it has none."""
    key, files = item
    caption = files.get("txt", b"").decode("utf-8", "replace")
    meta = json.loads(files["json"]) if "json" in files else {}
    media = {e: d for e, d in files.items() if e not in ("txt", "json") and not STORED_FRAME.match(e)}
    ext = next((e for e in VIDEO_EXTS if e in files), None)
    if ext is None:
        return key, caption, media, meta, "no video member"
    try:
        frames, fields = add_frames(files[ext], opts)
    except VideoError as err:
        return key, caption, media, meta, str(err)
    return key, caption, {**media, **frames}, {**meta, **fields}, None


def _add_frames_to_shard(fs, src: str, dst: str, name: str, opts: VideoOptions, pool: ThreadPoolExecutor,
                         window: int, bar: tqdm) -> dict:
    """One shard: every sample copied with its stored frames; one whose clip does not decode is left out
    (counted in the stats as failed_to_resize, like the stage's own failures)."""
    start, stem = time.time(), name.split(".")[0]
    writer = ShardWriter(dst, int(stem), len(stem))
    counts, status = Counter(), Counter()
    try:
        samples = _tar_samples(fs, join(src, name), status)
        for key, caption, media, meta, error in _ordered_map(pool, lambda s: _sample_with_frames(s, opts),
                                                              samples, window):
            counts["success" if error is None else "failed_to_resize"] += 1
            status[error or "success"] += 1
            writer.write(key, caption, {**meta, "key": meta.get("key", key)}, media if error is None else {})
            bar.update(1)
    except BaseException:
        writer.abort()
        raise
    end = time.time()
    stats = {"count": sum(counts.values()), "successes": counts["success"], "failed_to_download": 0,
             "failed_to_resize": counts["failed_to_resize"], "duration": end - start, "start_time": start,
             "end_time": end, "status_dict": dict(status)}
    writer.close(stats)
    return stats


def _declared_samples(fs, root: str, tars: list[str]) -> int | None:
    """The samples the shards' _stats.json declare (for the progress bar); None when one has none."""
    total = 0
    for name in tars:
        path = join(root, name.split(".")[0] + "_stats.json")
        if not fs.exists(path):
            return None
        total += read_json(fs, path).get("successes", 0)
    return total


def add_frames_to_shards(src: str, dst: str, opts: VideoOptions, threads: int = 4) -> dict:
    """Copy the shards of `src` to `dst` with stored frames added; shards finished in `dst` (their
    _stats.json exists) are kept, so an interrupted run resumes. Returns totals over the shards done."""
    fs, src_root = url_to_fs(src)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(src_root, detail=False))
    tars = [n for n in names if TAR_RE.match(n)]
    done = finished_shards(dst)
    todo = [n for n in tars if int(n.split(".")[0]) not in done]
    dst_fs, dst_root = url_to_fs(dst)
    dst_fs.makedirs(dst_root, exist_ok=True)
    totals = Counter()
    with ThreadPoolExecutor(max(1, threads)) as pool, \
            tqdm(total=_declared_samples(fs, src_root, todo), desc=f"add-frames, {len(todo)} of {len(tars)} shards",
                 unit="sample", dynamic_ncols=True) as bar:
        for name in todo:
            stats = _add_frames_to_shard(fs, src_root, dst, name, opts, pool, 4 * max(1, threads), bar)
            totals.update(count=stats["count"], successes=stats["successes"], failed=stats["failed_to_resize"])
    return {"shards": len(todo), "kept": len(tars) - len(todo), **totals}


def add_frames_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="folder of shards written without stored frames")
    p.add_argument("dst", help="output folder; indexed at the end (sizes.json, report.json)")
    p.add_argument("--frames", type=int, default=VideoOptions.frames)
    p.add_argument("--frame-quality", type=int, default=VideoOptions.frame_quality)
    p.add_argument("--threads", type=int, default=4)


def add_frames_command(args: argparse.Namespace) -> int:
    """`add-frames SRC DST` (here and in `python -m dataprep`): exit status 0 when DST validates."""
    opts = VideoOptions(frames=args.frames, frame_quality=args.frame_quality)
    if opts.frames < 1:
        raise SystemExit("add-frames: --frames must be at least 1")
    totals = add_frames_to_shards(args.src, args.dst, opts, args.threads)
    print(f"{totals['shards']} shards written ({totals['kept']} already done): {totals.get('successes', 0)} of "
          f"{totals.get('count', 0)} samples with frames, {totals.get('failed', 0)} left out -> {args.dst}")
    # Every clip was decoded in full above: the index need not decode them again.
    report = validate(args.dst, decode=False, workers=args.threads)
    for line in report["errors"] + report["warnings"]:
        print(line)
    return 0 if report["ok"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dataprep.videos", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    add_frames_arguments(sub.add_parser("add-frames", help="copy video shards, adding stored frames (resumable)"))
    return add_frames_command(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
