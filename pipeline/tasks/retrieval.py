"""Image-text (Flickr30k, COCO) and video-text (MSR-VTT) retrieval fine-tuning.

Readers (an item = one image or video with its captions)
    karpathy  dataset_coco.json / dataset_flickr30k.json: {"images": [{"filepath", "filename",
              "split": train|restval|val|test, "sentences": [{"raw"}]}]}; train = train + restval
    albef     [{"image" | "video": path, "caption": str | [str]}] (ALBEF / BLIP *_train.json, *_test.json)
    msrvtt    JSFusion CSV `key;vid_key;video_id;sentence` (the 1k-A test), or CLIP4Clip's
              MSRVTT_data.json with `task.train_ids` (9k list: one id per line, or a csv with video_id)
Training   the pre-training ITC + ITM (hard negatives from softmax(sim / τ)), no masking: the SCL model
           itself with the task config's loss weights (configs/finetune_retrieval.yaml)
Evaluation ITC ranks every candidate; each query's top `eval.itm_rerank_k` (ALBEF: 128 Flickr,
           256 COCO) are re-scored by ITC + ITM; R@1/5/10 both ways (pipeline.retrieval)
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from pipeline import retrieval
from pipeline.data.samples import BadSample
from pipeline.data.shards import DataError
from pipeline.model.scl import SCLModel
from pipeline.tasks.common import load_media, tokenize


def read_karpathy(path: str, media_root: str, split: str) -> list[dict]:
    wanted = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}[split]
    items = []
    for img in json.loads(Path(path).read_text())["images"]:
        if img["split"] in wanted:
            rel = Path(img.get("filepath", "")) / img["filename"]
            items.append({"id": img.get("cocoid", img.get("imgid", img["filename"])),
                          "media": str(Path(media_root) / rel), "captions": [s["raw"].strip() for s in img["sentences"]]})
    return items


def read_albef(path: str, media_root: str) -> list[dict]:
    merged: dict[str, list[str]] = {}
    for r in json.loads(Path(path).read_text()):
        media = r.get("image") or r.get("video")
        caps = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
        merged.setdefault(media, []).extend(c.strip() for c in caps if c.strip())
    return [{"id": m, "media": str(Path(media_root) / m), "captions": c} for m, c in merged.items()]


def _ids(path: str) -> list[str]:
    text = Path(path).read_text().splitlines()
    if text and text[0].strip() == "video_id":  # CLIP4Clip csv
        text = text[1:]
    return [t.strip() for t in text if t.strip()]


def read_msrvtt(path: str, media_root: str, ids_file: str = "") -> list[dict]:
    p = Path(path)
    merged: dict[str, list[str]] = {}
    if p.suffix == ".csv":
        with p.open(newline="") as f:
            for row in csv.DictReader(f, delimiter=";"):
                merged.setdefault(row["video_id"], []).append(row["sentence"].strip())
    else:
        data = json.loads(p.read_text())
        keep = set(_ids(ids_file)) if ids_file else None
        for s in data["sentences"]:
            if keep is None or s["video_id"] in keep:
                merged.setdefault(s["video_id"], []).append(s["caption"].strip())
    return [{"id": v, "media": str(Path(media_root) / f"{v}.mp4"), "captions": c} for v, c in merged.items()]


def read_items(cfg, split: str) -> list[dict]:
    t = cfg.task
    path = getattr(t, split)
    if not path:
        return []
    if not Path(path).is_file():
        raise DataError(f"task.{split}={path}: file not found")
    if path.endswith(".csv"):
        return read_msrvtt(path, t.media_root)
    head = json.loads(Path(path).read_text())
    if isinstance(head, dict) and "images" in head:
        return read_karpathy(path, t.media_root, split)
    if isinstance(head, dict) and "sentences" in head:
        return read_msrvtt(path, t.media_root, t.train_ids if split == "train" else "")
    return read_albef(path, t.media_root)


def read_split(cfg, split: str) -> list[dict]:
    """Training: one record per (item, caption); val/test: one record per item with all captions."""
    items = read_items(cfg, split)
    if split != "train":
        return items
    return [{"id": f"{it['id']}#{k}", "media": it["media"], "caption": c}
            for it in items for k, c in enumerate(it["captions"])]


class _Samples:
    """(key, pixels, captions) of eval items for pipeline.retrieval; unloadable items counted."""

    def __init__(self, items, cfg):
        self.items, self.cfg, self.skipped = items, cfg, {}

    def __iter__(self):
        for it in self.items:
            try:
                yield str(it["id"]), load_media(it["media"], self.cfg.task.modality, self.cfg, None), it["captions"]
            except BadSample as bad:
                self.skipped[bad.reason] = self.skipped.get(bad.reason, 0) + 1


class Task:
    name, best = "retrieval", ("eval/val/itc_itm_r_mean", "max")
    train_augment = True

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def build_model(self):
        model = SCLModel(self.cfg)
        model.mlm_head = None  # ITC + ITM only
        model.task_params = ()
        return model

    def make_sample(self, record, rng):
        return {"pixels": load_media(record["media"], self.cfg.task.modality, self.cfg, rng), "caption": record["caption"]}

    def collate(self, samples):
        batch = tokenize(self.tokenizer, [s["caption"] for s in samples], self.cfg.model.text.max_len)
        batch["pixels"] = torch.stack([s["pixels"] for s in samples])
        return batch

    def evaluate_items(self, model, items) -> dict:
        samples = _Samples(items, self.cfg)
        m = retrieval.evaluate_retrieval(model, samples, self.tokenizer, self.cfg)
        m = {k: v for k, v in m.items() if not isinstance(v, str)}
        m.update({f"skipped/{k}": v for k, v in samples.skipped.items()})
        return m
