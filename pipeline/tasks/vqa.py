"""VQAv2: answer classification over a fixed answer vocabulary (METER / SCL recipe).

Readers
    official  v2_OpenEnded_mscoco_<split>_questions.json (+ v2_mscoco_<split>_annotations.json for
              train/val): images at <media_root>/<split>/COCO_<split>_<image_id:012d>.jpg, or
              directly under <media_root>
    albef     [{"question_id", "question", "image": "val2014/COCO_val2014_...jpg", "answer": [...]}]
Head       pooled text + vision features (2d) -> Linear-LN-GELU-Linear -> |answers| logits
Loss       binary cross-entropy against soft scores min(1, #humans/3), times |answers| (METER)
Metric     the official VQA accuracy: an answer scores min(1, matches/3) against each leave-one-out
           set of 9 of the 10 human answers, averaged; answers normalised as the official evaluation
           does (punctuation, number words, articles, contractions); overall and per answer type
Output     test predictions in the evaluation server's format [{"question_id": int, "answer": str}]

    python -m pipeline.tasks.vqa vocab --annotations train.json val.json --out answers.json [--top 3129]
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data.shards import DataError
from pipeline.model.scl import SCLModel, init_fusion_weights
from pipeline.tasks.common import BaseTask, load_media

# ---------------------------------------------------------------- the official answer normalisation
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll "
    "how's i'd i'm i've isn't it'd it'll let's ma'am mightn't might've mustn't must've needn't o'clock "
    "shan't she'd she's should've shouldn't that's there'd there's they'd they'll they're they've wasn't "
    "we'd we've weren't what'll what're what's what've when's where'd where's who'd who'll who's who've "
    "why'll why're why's won't would've wouldn't y'all you'd you'll you're you've").split()}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """What the official evaluation does to a predicted answer (and what the vocabulary stores)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(predicted: str, human_answers: list[str]) -> float:
    """Official VQA accuracy of one prediction against the (usually 10) human answers."""
    pred = normalize_answer(predicted)
    gts = list(human_answers)
    if len(set(gts)) > 1:  # as the official script: punctuation only, and only when the humans differ
        gts = [process_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(accs) / len(accs)


def soft_scores(human_answers: list[str]) -> dict[str, float]:
    """Training targets: min(1, #humans who gave the (normalised) answer / 3)."""
    counts = Counter(normalize_answer(a) for a in human_answers)
    return {a: min(1.0, c / 3) for a, c in counts.items()}


def accuracy_report(predictions: dict, records: list[dict]) -> dict:
    """{"vqa_score": overall %, "vqa_score/<answer type>": %, "n_scored"} over records with answers."""
    overall, by_type = [], {}
    for i, r in enumerate(records):
        if not r.get("answers") or i not in predictions:
            continue
        acc = vqa_accuracy(predictions[i], r["answers"])
        overall.append(acc)
        by_type.setdefault(r.get("answer_type") or "all", []).append(acc)
    if not overall:
        return {"n_scored": 0}
    out = {"vqa_score": 100 * sum(overall) / len(overall), "n_scored": len(overall)}
    out.update({f"vqa_score/{t.replace('/', '_')}": 100 * sum(v) / len(v) for t, v in by_type.items()})
    return out


# ---------------------------------------------------------------- readers
def _image_path(media_root: str, subtype: str | None, image_id: int) -> str:
    """The image of `image_id`: <root>/<subtype>/COCO_<subtype>_<id>.jpg, <root>/COCO_<subtype>_<id>.jpg,
    any <root>/COCO_*_<id>.jpg, or COCO-2017's <root>/<id>.jpg; the first candidate if none exists."""
    root, iid = Path(media_root), int(image_id)
    cands = []
    if subtype:
        name = f"COCO_{subtype}_{iid:012d}.jpg"
        cands += [root / subtype / name, root / name]
    cands += sorted(root.glob(f"COCO_*_{iid:012d}.jpg")) + [root / f"{iid:012d}.jpg"]
    return str(next((c for c in cands if c.is_file()), cands[0]))


def read_official(questions_file: str, annotations_file: str | None, media_root: str) -> list[dict]:
    q = json.loads(Path(questions_file).read_text())
    found = re.search(r"(train|val|test-dev|test)\d{4}", Path(questions_file).name)
    subtype = q.get("data_subtype") or (found.group(0) if found else None)
    anns = {}
    if annotations_file:
        for a in json.loads(Path(annotations_file).read_text())["annotations"]:
            anns[a["question_id"]] = a
    records = []
    for item in q["questions"]:
        a = anns.get(item["question_id"])
        if annotations_file and a is None:
            raise DataError(f"{annotations_file}: no annotation for question {item['question_id']}")
        records.append({"id": item["question_id"], "question_id": item["question_id"], "question": item["question"],
                        "image": _image_path(media_root, subtype, item["image_id"]),
                        "answers": [x["answer"] for x in a["answers"]] if a else None,
                        "answer_type": a.get("answer_type") if a else None})
    return records


def read_albef(path: str, media_root: str) -> list[dict]:
    rows = json.loads(Path(path).read_text())
    return [{"id": r["question_id"], "question_id": r["question_id"], "question": r["question"],
             "image": str(Path(media_root) / r["image"]),
             "answers": list(r["answer"]) if r.get("answer") else None, "answer_type": r.get("answer_type")}
            for r in rows]


def read_split(cfg, split: str) -> list[dict]:
    t = cfg.task
    path = getattr(t, split)
    if not path:
        return []
    if not Path(path).is_file():
        raise DataError(f"task.{split}={path}: file not found")
    questions = getattr(t, f"{split}_questions")
    if questions:
        if not Path(questions).is_file():
            raise DataError(f"task.{split}_questions={questions}: file not found")
        return read_official(questions, path, t.media_root)
    head = json.loads(Path(path).read_text())
    if isinstance(head, dict) and "questions" in head:  # an official questions file alone (test)
        return read_official(path, None, t.media_root)
    return read_albef(path, t.media_root)


# ---------------------------------------------------------------- answer vocabulary
def build_vocab(annotation_files: list[str], top: int = 3129) -> list[str]:
    """The `top` most frequent normalised answers of the given official annotation / ALBEF files
    (each question counts its `multiple_choice_answer`, or its most frequent human answer)."""
    counts = Counter()
    for f in annotation_files:
        data = json.loads(Path(f).read_text())
        rows = data["annotations"] if isinstance(data, dict) else data
        for r in rows:
            if "multiple_choice_answer" in r:
                counts[normalize_answer(r["multiple_choice_answer"])] += 1
            else:
                answers = [a["answer"] if isinstance(a, dict) else a for a in (r.get("answers") or r.get("answer"))]
                counts[Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]] += 1
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def load_vocab(path: str) -> list[str]:
    if not path or not Path(path).is_file():
        raise DataError(f"task.answers={path!r}: answer vocabulary not found (build one: python -m pipeline.tasks.vqa "
                        "vocab --annotations <train> <val> --out answers.json)")
    vocab = json.loads(Path(path).read_text())
    if not isinstance(vocab, list) or not vocab:
        raise DataError(f"{path}: expected a non-empty JSON list of answers")
    return vocab


# ---------------------------------------------------------------- model
class VQAModel(SCLModel):
    """The SCL model with an answer classifier on the pooled fused features."""

    task_params = ("vqa_head",)

    def __init__(self, cfg, num_answers: int):
        super().__init__(cfg)
        d = cfg.model.fusion.hidden
        self.vqa_head = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(), nn.Linear(2 * d, num_answers))
        init_fusion_weights(self.vqa_head, d, cfg.model.fusion.init_std)
        self.mlm_head = self.itm_head = self.text_proj = self.vision_proj = None  # not used here

    def logits(self, batch):
        fused = self.fuse(self.encode_text(batch["text_ids"], batch["attention_mask"]), batch["attention_mask"],
                          self.encode_vision(batch["pixels"]))
        return self.vqa_head(torch.cat([fused["text_pooled"], fused["vision_pooled"]], dim=-1))

    def forward(self, batch, generator=None):
        logits = self.logits(batch).float()
        targets = batch["targets"].float()
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        return {"vqa": loss, "loss": loss}


# ---------------------------------------------------------------- the task
class Task(BaseTask):
    name, best = "vqa", ("eval/val/vqa_score", "max")

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.vocab = load_vocab(cfg.task.answers)
        self.index = {a: i for i, a in enumerate(self.vocab)}

    def build_model(self):
        return VQAModel(self.cfg, len(self.vocab))

    def make_sample(self, record, rng):
        pixels = load_media(record["image"], "image", self.cfg, rng)
        target = torch.zeros(len(self.vocab))
        for answer, score in soft_scores(record.get("answers") or []).items():
            if answer in self.index:
                target[self.index[answer]] = score
        return {"pixels": pixels, "question": record["question"], "targets": target}

    def collate(self, samples):
        batch = self.text([s["question"] for s in samples])
        batch.update(pixels=torch.stack([s["pixels"] for s in samples]),
                     targets=torch.stack([s["targets"] for s in samples]))
        return batch

    def run_batch(self, model, batch):
        return [self.vocab[i] for i in model.logits(batch).argmax(-1).tolist()]

    def metrics(self, predictions: dict, records: list[dict]) -> dict:
        return accuracy_report(predictions, records)

    def prediction_file(self, predictions: dict, records: list[dict]) -> list[dict]:
        return [{"question_id": int(records[i]["question_id"]), "answer": predictions[i]} for i in sorted(predictions)]


def main(argv=None):
    ap = argparse.ArgumentParser(description="VQAv2 answer vocabulary")
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vocab", help="the most frequent answers of annotation files")
    v.add_argument("--annotations", nargs="+", required=True, help="official annotation or ALBEF json files")
    v.add_argument("--out", required=True)
    v.add_argument("--top", type=int, default=3129)
    args = ap.parse_args(argv)
    vocab = build_vocab(args.annotations, args.top)
    Path(args.out).write_text(json.dumps(vocab))
    print(f"{len(vocab)} answers -> {args.out}")


if __name__ == "__main__":
    main()
