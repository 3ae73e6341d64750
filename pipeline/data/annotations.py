"""Evaluation sets given as an annotation file beside a folder of images or videos.

    JSONL  one row per item: {"image"|"video"|"path": <file, relative to the folder>,
           "captions": [...] or "caption": "..."}; rows naming the same file are merged
           (COCO / Flickr30K Karpathy-style sets, the shared COCO-239 sample)
    CSV    MSR-VTT JSFusion test list `key;vid_key;video_id;sentence` -> <folder>/<video_id>.mp4

Items yield in file order with the same deterministic transforms as shard-based eval sets.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from pipeline.data.evalset import EvalSamples
from pipeline.data.shards import DataError, RawSample, Skips

ANNOTATION_SUFFIXES = (".jsonl", ".csv")


def read_annotation(path: Path) -> list[tuple[str, list[str]]]:
    """[(relative media path, captions)] in first-seen order."""
    items: dict[str, list[str]] = {}
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            media = row.get("image") or row.get("video") or row.get("path")
            caps = row.get("captions") or ([row["caption"]] if row.get("caption") else [])
            if not media:
                raise DataError(f"{path}:{n}: row has no image/video/path field")
            items.setdefault(media, []).extend(c.strip() for c in caps if c.strip())
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            for row in csv.DictReader(f, delimiter=";"):
                items.setdefault(f"{row['video_id']}.mp4", []).append(row["sentence"].strip())
    else:
        raise DataError(f"{path}: annotation files are .jsonl or MSR-VTT .csv")
    return list(items.items())


class AnnotationSamples(EvalSamples):
    """Iterable of (key, pixels [T, 3, H, W], captions) from an annotation file and a media folder."""

    def __init__(self, annotation: str, modality: str, cfg, folder: str | None = None,
                 num_samples: int | None = None):
        if modality not in ("image", "video"):
            raise ValueError(f"modality={modality!r} must be 'image' or 'video'")
        self.path = Path(annotation)
        if not self.path.is_file():
            raise DataError(f"annotation file {annotation} not found")
        self.folder = Path(folder) if folder else self.path.parent
        self.modality, self.cfg, self.num_samples = modality, cfg, num_samples
        self.items = read_annotation(self.path)
        self.skipped: dict = {}

    def raw_samples(self, skips: Skips):
        for media, captions in self.items:
            file = self.folder / media
            if not file.is_file():
                skips.add("missing_file", str(file))
                continue
            yield RawSample(key=Path(media).stem, url=str(self.path),
                            files={file.suffix.lstrip(".").lower(): file.read_bytes(),
                                   "json": json.dumps({"captions": captions}).encode()})

    def describe(self) -> str:
        return f"{self.path} (media in {self.folder})"
