"""The video download stage: video2dataset's output format, img2dataset's guarantees, PyAV's decoder.

video2dataset itself is not used: its releases pin an old torch, and it has stored an HTTP error
page as a "successful" mp4. Here every clip is fetched (HTTP with timeout and retries, or a local
path), decoded frame by frame, trimmed to `max_duration`, resampled to `fps`, resized, re-encoded
to H.264 and decoded once more before it counts as a success. Audio is dropped: the models here
read frames only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

from .fetch import fetch
from .shards import SampleResult


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
    crf: int = 23

    def __post_init__(self):
        if self.resize_mode not in ("keep_ratio", "center_crop"):
            raise ValueError(f"video resize_mode must be keep_ratio or center_crop, not {self.resize_mode!r}")


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


def transcode(data: bytes, opts: VideoOptions) -> tuple[bytes, dict]:
    """Decode, trim, resample, resize and re-encode one video; returns (mp4 bytes, metadata)."""
    import av  # heavy; imported where videos are handled

    try:
        source = av.open(io.BytesIO(data))
    except av.error.FFmpegError as err:
        raise VideoError(f"not a video: {err}") from err
    with source:
        # FFmpeg also opens still images as one-frame videos; a caption for a still is not a clip's.
        if not source.streams.video or source.format.name.endswith("_pipe") or source.format.name == "image2":
            raise VideoError(f"no video stream (format {source.format.name})")
        stream = source.streams.video[0]
        src_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        src_duration = _source_duration(source, stream)
        if opts.max_source_duration and src_duration and src_duration > opts.max_source_duration:
            raise VideoError(f"video too long: {src_duration:.1f}s > {opts.max_source_duration}s")
        out_fps = Fraction(min(opts.fps, src_fps) if opts.fps else src_fps).limit_denominator(1001)
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise VideoError("no video stream: zero frame size")
        sw, sh, ow, oh = _output_size(width, height, opts)

        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4") as sink:
            out = sink.add_stream("libx264", rate=out_fps)
            out.width, out.height, out.pix_fmt = ow, oh, "yuv420p"
            out.options = {"crf": str(opts.crf), "preset": "veryfast", "threads": "1"}
            n_out, t0, trimmed = 0, None, False
            tolerance = 0.5 / src_fps
            try:
                for index, frame in enumerate(source.decode(stream)):
                    t = frame.time if frame.time is not None else index / src_fps
                    t0 = t if t0 is None else t0
                    rel = t - t0
                    if rel >= opts.max_duration - 1e-6:
                        trimmed = True
                        break
                    if rel + tolerance < n_out / out_fps:
                        continue  # dropped to lower the frame rate
                    crop = (sw, sh) != (ow, oh)
                    out_frame = frame.reformat(width=sw, height=sh, format="rgb24" if crop else "yuv420p")
                    if crop:
                        x, y = (sw - ow) // 2, (sh - oh) // 2
                        arr = out_frame.to_ndarray()[y:y + oh, x:x + ow]
                        out_frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
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
    mp4 = buffer.getvalue()
    checked = _count_frames(mp4)
    if checked != n_out:
        raise VideoError(f"decoding error: re-encoded clip has {checked} of {n_out} frames")
    meta = {
        "duration": n_out / float(out_fps),
        "fps": float(out_fps),
        "num_frames": n_out,
        "width": ow,
        "height": oh,
        "original_width": width,
        "original_height": height,
        "original_fps": src_fps,
        "original_duration": src_duration,
        "trimmed": trimmed,
    }
    return mp4, meta


def _count_frames(mp4: bytes) -> int:
    import av

    with av.open(io.BytesIO(mp4)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


class VideoProcessor:
    """One annotation row -> a SampleResult; picklable, so shards can go to other processes."""

    def __init__(self, opts: VideoOptions):
        self.opts = opts

    def __call__(self, row: dict) -> SampleResult:
        data, error = fetch(row, self.opts.timeout, self.opts.retries, self.opts.max_bytes)
        if data is None:
            return SampleResult("failed_to_download", error_message=error)
        try:
            mp4, meta = transcode(data, self.opts)
        except VideoError as err:
            return SampleResult("failed_to_resize", error_message=str(err), bytes_downloaded=len(data))
        return SampleResult("success", {"mp4": mp4}, meta, bytes_downloaded=len(data))
