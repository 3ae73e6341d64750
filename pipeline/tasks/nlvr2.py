"""NLVR2: is a sentence true of a pair of images? (METER / SCL pair scheme)

Readers
    official  jsonl rows {"identifier": "dev-850-0-0", "sentence", "label": "True"|"False", ...}; the
              images as the release lays them out: <media_root>/<split>/<split>-<set>-<pair>-img0.png
              (train: <media_root>/train/<directory>/...), or directly under <media_root>
    albef     [{"images": ["dev/dev-850-0-img0.png", ...], "sentence", "label": "True"|"False"}]
Model      each image fused with the sentence, the first as token type 1, the second as type 2 (a
           third token-type row, initialised from the image row: the released recipe); the two pairs
           of pooled features (4d) -> Linear-LN-GELU-Linear -> 2 logits; cross-entropy
Metrics    accuracy, and consistency (the official second metric): the share of sentences, over
           all image pairs they were written for, whose every prediction is right
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data.shards import DataError
from pipeline.model.scl import SCLModel, init_fusion_weights
from pipeline.tasks.common import BaseTask, load_media


def _label(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1"):
        return True
    if str(value).lower() in ("false", "0"):
        return False
    raise DataError(f"NLVR2 label {value!r} is neither True nor False")


def sentence_group(identifier: str) -> str:
    """The official consistency key: the identifier with its image-pair id blanked."""
    parts = identifier.split("-")
    if len(parts) == 4:
        parts[2] = ""
    return "-".join(parts)


def accuracy_and_consistency(predictions: dict, records: list[dict]) -> dict:
    """{"accuracy", "consistency"} in percent over the records that have a prediction."""
    right, groups = [], {}
    for i, r in enumerate(records):
        if i not in predictions or r.get("label") is None:
            continue
        ok = bool(predictions[i]) == r["label"]
        right.append(ok)
        key = sentence_group(r["identifier"])
        groups[key] = groups.get(key, True) and ok
    if not right:
        return {"n_scored": 0}
    return {"accuracy": 100 * sum(right) / len(right), "consistency": 100 * sum(groups.values()) / len(groups),
            "n_scored": len(right)}


def _image_pair(media_root: str, row: dict) -> tuple[str, str]:
    ident = row["identifier"]
    split = ident.split("-")[0]
    stem = "-".join(ident.split("-")[:-1])
    root = Path(media_root)
    sub = root / split / str(row["directory"]) if "directory" in row else root / split
    out = []
    for k in (0, 1):
        name = f"{stem}-img{k}.png"
        cand = [sub / name, root / split / name, root / name]
        out.append(str(next((c for c in cand if c.is_file()), cand[0])))
    return out[0], out[1]


def read_split(cfg, split: str) -> list[dict]:
    path = getattr(cfg.task, split)
    if not path:
        return []
    if not Path(path).is_file():
        raise DataError(f"task.{split}={path}: file not found")
    text = Path(path).read_text()
    records = []
    if text.lstrip().startswith("["):  # ALBEF layout
        for n, r in enumerate(json.loads(text)):
            left, right = (str(Path(cfg.task.media_root) / p) for p in r["images"])
            records.append({"id": r.get("identifier", n), "identifier": r.get("identifier", f"{split}-{n}-0-0"),
                            "sentence": r["sentence"], "label": _label(r["label"]) if "label" in r else None,
                            "left": left, "right": right})
        return records
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        if "identifier" not in r or "sentence" not in r:
            raise DataError(f"{path}:{n}: an NLVR2 row needs 'identifier' and 'sentence'")
        left, right = _image_pair(cfg.task.media_root, r)
        records.append({"id": r["identifier"], "identifier": r["identifier"], "sentence": r["sentence"],
                        "label": _label(r["label"]) if "label" in r else None, "left": left, "right": right})
    return records


class NLVR2Model(SCLModel):
    task_params = ("nlvr2_head",)

    def __init__(self, cfg):
        super().__init__(cfg)
        d = cfg.model.fusion.hidden
        self.nlvr2_head = nn.Sequential(nn.Linear(4 * d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(), nn.Linear(2 * d, 2))
        init_fusion_weights(self.nlvr2_head, d, cfg.model.fusion.init_std)
        self.mlm_head = self.itm_head = self.text_proj = self.vision_proj = None
        self.fusion.token_type = nn.Embedding(3, d)  # text, first image, second image
        init_fusion_weights(self.fusion.token_type, d, cfg.model.fusion.init_std)

    def adapt_pretrained(self, state: dict) -> dict:
        """A pre-training state has two token types: the second image's row starts as the image row."""
        key = "fusion.token_type.weight"
        if key in state and state[key].shape[0] == 2:
            state[key] = torch.cat([state[key], state[key][1:2]])
        return state

    def logits(self, batch):
        mask = batch["attention_mask"]
        text = self.encode_text(batch["text_ids"], mask)
        both = self.encode_vision(torch.cat([batch["pixels"], batch["pixels_right"]]))
        b = mask.shape[0]
        types = torch.tensor([1, 2], device=mask.device).repeat_interleave(b)
        # one fusion pass over the two (sentence, image) pairs of every row
        fused = self.fuse(torch.cat([text, text]), torch.cat([mask, mask]), both, types)
        t, v = fused["text_pooled"], fused["vision_pooled"]
        return self.nlvr2_head(torch.cat([t[:b], v[:b], t[b:], v[b:]], dim=-1))

    def forward(self, batch, generator=None):
        loss = F.cross_entropy(self.logits(batch).float(), batch["labels"])
        return {"nlvr2": loss, "loss": loss}


class Task(BaseTask):
    name, best = "nlvr2", ("eval/val/accuracy", "max")

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)

    def build_model(self):
        return NLVR2Model(self.cfg)

    def make_sample(self, record, rng):
        left = load_media(record["left"], "image", self.cfg, rng)
        right = load_media(record["right"], "image", self.cfg, rng)
        return {"pixels": left, "pixels_right": right, "sentence": record["sentence"],
                "label": int(bool(record.get("label")))}

    def collate(self, samples):
        batch = self.text([s["sentence"] for s in samples])
        batch.update(pixels=torch.stack([s["pixels"] for s in samples]),
                     pixels_right=torch.stack([s["pixels_right"] for s in samples]),
                     labels=torch.tensor([s["label"] for s in samples]))
        return batch

    def run_batch(self, model, batch):
        return [bool(x) for x in model.logits(batch).argmax(-1).tolist()]

    def metrics(self, predictions: dict, records: list[dict]) -> dict:
        return accuracy_and_consistency(predictions, records)

    def prediction_file(self, predictions: dict, records: list[dict]) -> list[dict]:
        return [{"identifier": records[i]["identifier"], "prediction": "True" if predictions[i] else "False"}
                for i in sorted(predictions)]
