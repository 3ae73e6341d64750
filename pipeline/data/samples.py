"""One raw shard sample -> (pixels [T, 3, H, W], captions), or the reason it cannot be used."""
from __future__ import annotations

import json
import random

import torch

from pipeline.data.image import (
    IMAGE_EXTS,
    MAX_PIXELS,
    Augment,
    TooManyPixels,
    decode_image,
)
from pipeline.data.shards import RawSample
from pipeline.data.video import VIDEO_EXTS, decode_frames, decode_video, stored_frames


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def captions_of(files: dict) -> list[str]:
    """The `.json`'s "captions" list when there is one (e.g. COCO's five), else the `.txt`, one per line."""
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError:
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
            captions = [c.strip() for c in meta["captions"] if isinstance(c, str) and c.strip()]
            if captions:
                return captions
    if "txt" not in files:
        return []
    return [line.strip() for line in files["txt"].decode("utf-8", "replace").splitlines() if line.strip()]


def decode_sample(raw: RawSample, modality: str, size: int, frames: int, rng: random.Random | None,
                  aug: Augment = Augment(), max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, list[str]]:
    """Pixels [T, 3, size, size] (T=1 for images) and the captions; train augmentation when `rng` is given."""
    if raw.problem:
        raise BadSample(raw.problem)
    captions = captions_of(raw.files)
    if not captions:
        raise BadSample("empty_caption" if "txt" in raw.files or "json" in raw.files else "missing_caption")
    exts = IMAGE_EXTS if modality == "image" else VIDEO_EXTS
    ext = next((e for e in exts if e in raw.files), None)
    stored = stored_frames(raw.files) if modality == "video" else {}  # preferred over the clip: cheaper
    if ext is None and not stored:
        wanted = "/".join(exts) + (" or frameNN.jpg" if modality == "video" else "")
        raise BadSample("missing_media", f"no {wanted} member")
    try:
        if modality == "image":
            pixels = decode_image(raw.files[ext], size, rng, aug, max_pixels)[None]
        elif stored:
            pixels = decode_frames(stored, frames, size, rng, aug, max_pixels)
        else:
            pixels = decode_video(raw.files[ext], frames, size, rng, aug)
    except TooManyPixels as err:
        raise BadSample("image_too_large", str(err)) from None
    except Exception as err:  # noqa: BLE001 - decoders raise many types on corrupt input
        raise BadSample(f"corrupt_{modality}", f"{type(err).__name__}: {err}") from None
    return pixels, captions
