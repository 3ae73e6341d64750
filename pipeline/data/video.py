"""Video decoding with PyAV: T frames, one spatial crop shared by every frame.

Frame choice: the video's n frames are cut into T equal segments; training takes a random frame of
each segment, evaluation the middle one. A video with fewer than T frames repeats frames.

Decoding a whole clip costs ~3 ms per frame here, so a 35 s clip would take seconds. Instead a
demux pass (no decoding) lists the frames' timestamps and keyframes; each wanted frame is reached
by seeking to the keyframe before it, unless decoding on from the current position is shorter.
"""
from __future__ import annotations

import bisect
import io
import random

import av
import numpy as np
import torch

from pipeline.data.image import center_crop_box, crop_resize, random_crop_box

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


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


def _decode_at(container, stream, targets: list[int], keys: list[int]) -> dict:
    """PIL frames at the given presentation timestamps (ascending), seeking to keyframes when it helps."""
    out = {}
    frames, pos, last = None, None, None
    for target in targets:
        if last is not None and last.pts is not None and last.pts >= target:
            out[target] = last.to_image()
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
        out[target] = last.to_image()
    return out


def decode_video(data: bytes, frames: int, size: int, rng: random.Random | None = None,
                 scale: tuple[float, float] = (0.5, 1.0)) -> torch.Tensor:
    """Encoded video -> [frames, 3, size, size], random crop + random frames when `rng` is given."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        pts, keys = _timestamps(container, stream)
        if not pts:
            raise ValueError("no video frames")
        targets = [pts[i] for i in frame_indices(len(pts), frames, rng)]
        images = _decode_at(container, stream, sorted(set(targets)), keys)
    first = images[targets[0]]
    box = random_crop_box(*first.size, scale, rng) if rng is not None else center_crop_box(*first.size)
    return torch.from_numpy(np.stack([crop_resize(images[t], box, size) for t in targets]))
