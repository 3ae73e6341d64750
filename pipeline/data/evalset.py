"""Evaluation samples: every sample of some shards, in shard order, with deterministic transforms."""
from __future__ import annotations

from pipeline.config import check_pipe
from pipeline.data.samples import BadSample, decode_sample
from pipeline.data.shards import (
    DataError,
    SeenKeys,
    Skips,
    expand_shards,
    missing_message,
    missing_shards,
    read_shard,
)


class EvalSamples:
    """Iterable of (key, pixels [T, 3, H, W], captions); bad samples are skipped and counted in `skipped`,
    a key read a second time among the shards too ("duplicate_key": the first is kept).

    Images: resize + centre crop to data.image_size; videos: data.num_frames frames taken uniformly,
    centre crop to data.video_size. Iterating again gives the same samples in the same order.
    """

    def __init__(self, shards: str, modality: str, cfg, num_samples: int | None = None):
        if modality not in ("image", "video"):
            raise ValueError(f"modality={modality!r} must be 'image' or 'video'")
        check_pipe(shards, "the eval set", cfg.data.allow_pipe)
        self.urls = expand_shards(shards)
        if not self.urls:
            raise DataError(f"eval shards '{shards}' name no files")
        missing = missing_shards(self.urls)
        if missing:  # a score over part of the set would not compare with other runs
            raise DataError(missing_message(f"eval set '{shards}'", self.urls, missing))
        self.modality, self.cfg = modality, cfg
        self.num_samples = num_samples if num_samples is not None else (cfg.eval.num_samples or None)
        self.skipped: dict = {}

    def raw_samples(self, skips: Skips):
        keys = SeenKeys()  # one reader reads the whole set: a key met again is never scored twice
        for url in self.urls:
            for raw in read_shard(url, skips):
                keys.check(raw)
                yield raw

    def describe(self) -> str:
        return f"eval shards {self.urls[0]}..."

    def __iter__(self):
        d = self.cfg.data
        size, frames = (d.video_size, d.num_frames) if self.modality == "video" else (d.image_size, 1)
        skips, count = Skips("eval"), 0
        self.skipped = skips.pending  # live counts, readable while iterating
        for raw in self.raw_samples(skips):
            if self.num_samples is not None and count >= self.num_samples:
                return
            try:
                pixels, captions = decode_sample(raw, self.modality, size, frames, None, max_pixels=d.max_image_pixels)
            except BadSample as bad:
                skips.add(bad.reason, f"{raw.label()}: {bad}")
                continue
            count += 1
            yield raw.key, pixels, captions
        if count == 0:
            raise DataError(f"{self.describe()} hold no usable {self.modality} sample (skipped: {self.skipped})")


def build_eval_samples(shards: str, modality: str, cfg, num_samples: int | None = None) -> EvalSamples:
    """Samples for retrieval evaluation (num_samples: None = cfg.eval.num_samples, 0 there = all)."""
    return EvalSamples(shards, modality, cfg, num_samples)
