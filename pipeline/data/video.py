"""Video decoding: T frames, one spatial crop shared by every frame, from a clip or stored frames.

Frame choice: the video's n frames are cut into T equal segments; training takes a random frame of
each segment, evaluation the middle one. A video with fewer than T frames repeats frames.

A sample holds a clip (`mp4`, ...) and/or K stored frames (`frame00.jpg` ... `frame<K-1>.jpg`,
written by dataprep). Stored frames are preferred: they are read as a K-frame video, so only T
small JPEGs are decoded and no container is opened (bench/RESULTS.md, "Video loading").

Clips: decoding a whole clip frame by frame would take seconds for a long one. Instead a demux pass
(no decoding) lists the frames' timestamps and keyframes; each wanted frame is reached by seeking to
the keyframe before it, unless decoding on from the current position is shorter.
"""
from __future__ import annotations

import bisect
import io
import random
import re

import av
import torch
from PIL import Image

from pipeline.data.image import MAX_PIXELS, Augment, augmented_crop, open_image, to_rgb

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
FRAME_RE = re.compile(r"^frame(\d+)\.(?:jpg|jpeg|png|webp)$")


def frame_indices(num_frames: int, frames: int, rng: random.Random | None = None) -> list[int]:
    """T indices into a video of `num_frames`: random within each segment (rng) or each segment's middle."""
    if num_frames < 1:
        raise ValueError("video has no frames")
    seg = num_frames / frames
    offsets = [rng.random() for _ in range(frames)] if rng is not None else [0.5] * frames
    return [min(num_frames - 1, int((i + u) * seg)) for i, u in enumerate(offsets)]


def _timestamps(container, stream):
    """Presentation timestamps of all frames (sorted) and of the keyframes, from packets only."""
    pts, keys = [], []
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:
            continue
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    return sorted(pts), sorted(keys)


def _rgb(frame) -> Image.Image:
    # One thread: swscale's default sets up a thread pool per call, which costs more than the conversion.
    return frame.to_image(threads=1)


def _decode_at(container, stream, targets: list[int], keys: list[int]) -> dict:
    """PIL frames at the given presentation timestamps (ascending), seeking to keyframes when it helps."""
    out = {}
    frames, pos, last = None, None, None
    for target in targets:
        if last is not None and last.pts is not None and last.pts >= target:
            out[target] = _rgb(last)
            continue
        k = bisect.bisect_right(keys, target) - 1
        key = keys[k] if k >= 0 else None
        if frames is None or (key is not None and pos is not None and key > pos):
            container.seek(key if key is not None else target, stream=stream, backward=True)
            frames = container.decode(stream)
        for frame in frames:
            pos, last = frame.pts, frame
            if frame.pts is not None and frame.pts >= target:
                break
        if last is None:
            raise ValueError("no decodable frame")
        # Past the end (a packet that decodes to nothing): the nearest earlier frame stands in.
        out[target] = _rgb(last)
    return out


def decode_video(data: bytes, frames: int, size: int, rng: random.Random | None = None,
                 aug: Augment = Augment()) -> torch.Tensor:
    """Encoded video -> [frames, 3, size, size], augmented crop + random frames when `rng` is given."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        # One thread: FFmpeg's default (a thread per core) costs more in start-up and hand-offs than it
        # saves on these small frames, and a loader worker has one core to itself at best.
        stream.codec_context.thread_count = 1
        pts, keys = _timestamps(container, stream)
        if not pts:
            raise ValueError("no video frames")
        targets = [pts[i] for i in frame_indices(len(pts), frames, rng)]
        images = _decode_at(container, stream, sorted(set(targets)), keys)
    return torch.from_numpy(augmented_crop([images[t] for t in targets], size, rng, aug))


def stored_frames(files: dict[str, bytes]) -> dict[int, bytes]:
    """A sample's stored frames by number ({0: frame00.jpg's bytes, ...}); empty when it has none."""
    out = {}
    for ext, data in files.items():
        m = FRAME_RE.match(ext)
        if m:
            out[int(m.group(1))] = data
    return out


def decode_frames(stored: dict[int, bytes], frames: int, size: int, rng: random.Random | None = None,
                  aug: Augment = Augment(), max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Stored frames 0..K-1 -> [frames, 3, size, size]: the same choice as a K-frame clip, decoding
    only the frames chosen. A gap in the numbering (a lost member) would shift the timing: an error."""
    if sorted(stored) != list(range(len(stored))):
        raise ValueError(f"stored frames are not numbered 0..{len(stored) - 1}: {sorted(stored)}")
    chosen = frame_indices(len(stored), frames, rng)
    images = {}
    for i in sorted(set(chosen)):
        img = open_image(stored[i], max_pixels)
        img.load()  # the full decode: a corrupt frame raises here
        images[i] = to_rgb(img)
    if len({img.size for img in images.values()}) > 1:
        raise ValueError(f"stored frames differ in size: {sorted({img.size for img in images.values()})}")
    return torch.from_numpy(augmented_crop([images[i] for i in chosen], size, rng, aug))
