"""Image-text (Flickr30k, COCO) and video-text (MSR-VTT) retrieval fine-tuning.

Readers (an item = one image or video with its captions)
    karpathy  dataset_coco.json / dataset_flickr30k.json: {"images": [{"filepath", "filename",
              "split": train|restval|val|test, "sentences": [{"raw"}]}]}; train = train + restval
    albef     [{"image" | "video": path, "caption": str | [str]}] (ALBEF / BLIP *_train.json, *_test.json)
    msrvtt    JSFusion CSV `key;vid_key;video_id;sentence` (the 1k-A test), or CLIP4Clip's
              MSRVTT_data.json with `task.train_ids` (9k list: one id per line, or a csv with video_id)
Training   `loss.irtr > 0` (the default of configs/finetune_retrieval.yaml; METER's and the released
           code's irtr): a ranking head, initialised from the ITM head's "match" row (the ITM head
           then frozen), scores each image with its caption and `loss.irtr_negatives` random captions
           of other items, cross-entropy towards the true one; plus `loss.itc` x image-to-text ITC
           over all those captions (0.5 for images, 1.0 for video in the released recipes).
           `loss.irtr = 0`: the pre-training ITC + ITM instead (the SCL model with the task's weights).
Evaluation ITC ranks every candidate; each query's top `eval.itm_rerank_k` (128 Flickr30k and
           MSR-VTT, 256 COCO) are re-scored (`eval.rerank`: the ranking head, or ITC + ITM);
           R@1/5/10 both ways (pipeline.zeroshot)
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
import torch.nn as nn

from pipeline import objectives as obj
from pipeline import zeroshot
from pipeline.data.samples import BadSample
from pipeline.data.shards import DataError
from pipeline.model.scl import SCLModel
from pipeline.tasks.common import BaseTask, load_media


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
    return [{"id": f"{it['id']}#{k}", "item": str(it["id"]), "media": it["media"], "caption": c}
            for it in items for k, c in enumerate(it["captions"])]


class _Samples:
    """(key, pixels, captions) of eval items for pipeline.zeroshot; unloadable items counted."""

    def __init__(self, items, cfg):
        self.items, self.cfg, self.skipped = items, cfg, {}

    def __iter__(self):
        for it in self.items:
            try:
                yield str(it["id"]), load_media(it["media"], self.cfg.task.modality, self.cfg, None), it["captions"]
            except BadSample as bad:
                self.skipped[bad.reason] = self.skipped.get(bad.reason, 0) + 1


class RetrievalModel(SCLModel):
    """The SCL model for retrieval fine-tuning: irtr (ranking head + caption ITC) when `loss.irtr > 0`,
    else the pre-training ITC + ITM."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mlm_head = None
        self.rank_head, self.task_params = None, ()
        if cfg.loss.irtr > 0:
            self.rank_head = nn.Linear(self.itm_head.in_features, 1)
            self._rank_from_itm(self.rank_head, self.itm_head.weight.data, self.itm_head.bias.data)
            self.itm_head.requires_grad_(False)  # the ranking head starts from it; it stays as pre-trained
            self.task_params = ("rank_head",)

    @staticmethod
    def _rank_from_itm(head, weight, bias):
        with torch.no_grad():
            head.weight.copy_(weight[1:2])
            head.bias.copy_(bias[1:2])

    def adapt_pretrained(self, state: dict) -> dict:
        """The ranking head starts as the pre-trained ITM head's "match" row."""
        if self.rank_head is not None and "itm_head.weight" in state:
            state["rank_head.weight"], state["rank_head.bias"] = state["itm_head.weight"][1:2], state["itm_head.bias"][1:2]
        return state

    def rank_logits(self, fused):
        return self.rank_head(torch.cat([fused["text_pooled"], fused["vision_pooled"]], dim=-1)).squeeze(-1)

    def forward(self, batch, generator=None, **kw):
        if self.rank_head is None:
            return super().forward(batch, generator, **kw)
        ids, mask = batch["text_ids"], batch["attention_mask"]  # [B, 1 + N, L]: the caption, then N negatives
        b, k, _ = ids.shape
        vision = self.encode_vision(batch["pixels"])
        text = self.encode_text(ids.flatten(0, 1), mask.flatten(0, 1))
        fused = self.fuse(text, mask.flatten(0, 1), vision.repeat_interleave(k, 0))
        losses = {"irtr": obj.ranking_loss(self.rank_logits(fused).view(b, k))}
        if self.loss_cfg.itc > 0:
            v, t = self.itc_features(vision, text)
            losses["itc"] = obj.caption_ranking_itc(v, t, k, self.temperature())
        losses["loss"] = sum(getattr(self.loss_cfg, name) * value for name, value in losses.items())
        losses["itc_temperature"] = self.temperature().detach()
        return losses


class Task(BaseTask):
    name = "retrieval"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.irtr = cfg.loss.irtr > 0
        self.best = (f"eval/val/{cfg.eval.rerank}_r_mean", "max")
        self.pool: list[dict] = []  # the training records negative captions are drawn from (bind_train)

    def bind_train(self, records: list[dict]) -> None:
        if self.irtr and len({r["item"] for r in records}) < 2:
            raise DataError("irtr needs captions of at least 2 items in task.train")
        self.pool = records

    def build_model(self):
        return RetrievalModel(self.cfg)

    def negatives(self, record, rng) -> list[str]:
        """`loss.irtr_negatives` captions of other items, drawn uniformly from the training split."""
        out = []
        while len(out) < self.cfg.loss.irtr_negatives:
            other = self.pool[rng.randrange(len(self.pool))]
            if other["item"] != record["item"]:
                out.append(other["caption"])
        return out

    def make_sample(self, record, rng):
        sample = {"pixels": load_media(record["media"], self.cfg.task.modality, self.cfg, rng),
                  "caption": record["caption"]}
        if self.irtr:
            sample["negatives"] = self.negatives(record, rng)
        return sample

    def collate(self, samples):
        texts = [[s["caption"], *s.get("negatives", ())] for s in samples]
        batch = self.text([t for row in texts for t in row])
        if self.irtr:  # [B, 1 + N, L]
            batch = {k: v.view(len(samples), len(texts[0]), -1) for k, v in batch.items()}
        batch["pixels"] = torch.stack([s["pixels"] for s in samples])
        return batch

    def evaluate_items(self, model, items) -> dict:
        samples = _Samples(items, self.cfg)
        m = zeroshot.evaluate_retrieval(model, samples, self.tokenizer, self.cfg)
        m = {k: v for k, v in m.items() if not isinstance(v, str)}
        m.update({f"skipped/{k}": v for k, v in samples.skipped.items()})
        return m
