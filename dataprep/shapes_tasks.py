"""Downstream sets of the shapes world, written in the real datasets' formats (answers by construction).

    VQAv2   <root>/vqa/{train2014,val2014}/COCO_<split>_<id:012d>.jpg,
            v2_OpenEnded_mscoco_<split>_questions.json + v2_mscoco_<split>_annotations.json
            ("what colour is the triangle?" -> "green", "how many shapes are there?" -> "2",
             "is there a red square?" -> "yes", "what shape is on the left?" -> "circle";
             10 human answers each, one of them a plausible wrong answer)
    NLVR2   <root>/nlvr2/{train,dev,test1}.json (official jsonl rows: identifier, sentence, label
            "True"/"False"), images <split>-<set>-<pair>-img{0,1}.png (train in <directory>/);
            every sentence is written for two image pairs, so consistency is defined
            ("the left image has more squares than the right image", "both images contain a red shape")
    Karpathy <root>/retrieval/dataset_shapes.json ({"images": [{filepath, filename, split, sentences}]})

    python -m dataprep tasks --out demo_out/tasks        # (or build_task_sets(root) from Python)
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .shapes import COLOURS, PLACES, SHAPES, _image_spec, render_image

VQA_SPLITS = {"train": "train2014", "val": "val2014"}
NLVR2_SPLITS = ("train", "dev", "test1")


def _free_boxes(n: int, rng: random.Random):
    """n non-overlapping centre boxes (x range, y range) on a 3x3 grid of cells."""
    cells = rng.sample([(i, j) for i in range(3) for j in range(3)], n)
    return [((0.17 + 0.33 * i, 0.17 + 0.33 * i), (0.17 + 0.33 * j, 0.17 + 0.33 * j)) for i, j in cells]


def _objects_spec(objects: list[tuple[str, str]], rng: random.Random) -> dict:
    boxes = _free_boxes(len(objects), rng)
    return {"objects": [(c, s, b) for (c, s), b in zip(objects, boxes)]}


def _render(spec, size, rng, path: Path, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = render_image(spec, size, rng)
    img.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


# ---------------------------------------------------------------- VQA
def _vqa_questions(spec: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, answer_type) pairs true of a picture."""
    objs = spec["objects"]
    qa = [("how many shapes are there?", str(len(objs)), "number")]
    shapes = [s for _, s, _ in objs]
    for colour, shape, _ in objs:
        if shapes.count(shape) == 1:
            qa.append((f"what colour is the {shape}?", colour, "other"))
    # half the yes/no questions name a shape that is there
    c, s = objs[rng.randrange(len(objs))][:2] if rng.random() < 0.5 else (rng.choice(list(COLOURS)), rng.choice(SHAPES))
    present = any(o[0] == c and o[1] == s for o in objs)
    qa.append((f"is there a {c} {s}?", "yes" if present else "no", "yes/no"))
    if "place" in spec:
        qa.append((f"what shape is {spec['place']}?", objs[0][1], "other"))
    return qa


def _wrong(answer: str, answer_type: str, rng: random.Random) -> str:
    pool = {"number": ["1", "2", "3"], "yes/no": ["yes", "no"]}.get(answer_type, list(COLOURS) + list(SHAPES))
    return rng.choice([a for a in pool if a != answer])


def build_vqa(root: Path, n_images: dict, size: int, seed: int) -> dict:
    out = {}
    qid = 0
    for split, subtype in VQA_SPLITS.items():
        rng = random.Random(f"{seed}-vqa-{split}")
        questions, annotations = [], []
        for k in range(n_images[split]):
            image_id = (1 if split == "train" else 2) * 1_000_000 + k
            if rng.random() < 0.5:
                colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                place = rng.choice(list(PLACES))
                spec = {"objects": [(colour, shape, PLACES[place])], "place": place}
            else:
                n = rng.choice([2, 3])
                spec = _objects_spec([(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(n)], rng)
            _render(spec, size, rng, root / "vqa" / subtype / f"COCO_{subtype}_{image_id:012d}.jpg")
            for question, answer, atype in _vqa_questions(spec, rng):
                qid += 1
                answers = [answer] * 9 + [_wrong(answer, atype, rng)]
                rng.shuffle(answers)
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                annotations.append({"question_type": " ".join(question.split()[:2]), "multiple_choice_answer": answer,
                                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                                for i, a in enumerate(answers)],
                                    "image_id": image_id, "answer_type": atype, "question_id": qid})
        qfile = root / "vqa" / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
        afile = root / "vqa" / f"v2_mscoco_{subtype}_annotations.json"
        qfile.write_text(json.dumps({"info": {"description": "shapes-world VQA"}, "task_type": "Open-Ended",
                                     "data_type": "mscoco", "data_subtype": subtype, "license": {},
                                     "questions": questions}))
        afile.write_text(json.dumps({"info": {"description": "shapes-world VQA"}, "data_type": "mscoco",
                                     "data_subtype": subtype, "license": {}, "annotations": annotations}))
        out[split] = {"questions": str(qfile), "annotations": str(afile)}
    out["media_root"] = str(root / "vqa")
    return out


# ---------------------------------------------------------------- NLVR2
def _nlvr2_statement(rng: random.Random):
    """A sentence template and its truth function over (left objects, right objects)."""
    kind = rng.randrange(3)
    if kind == 0:
        s = rng.choice(SHAPES)
        return (f"the left image has more {s}s than the right image",
                lambda L, R: sum(o[1] == s for o in L) > sum(o[1] == s for o in R))
    if kind == 1:
        c = rng.choice(list(COLOURS))
        return (f"both images contain a {c} shape",
                lambda L, R: any(o[0] == c for o in L) and any(o[0] == c for o in R))
    n = rng.choice([1, 2, 3])
    return (f"the right image contains exactly {['one', 'two', 'three'][n - 1]} shapes",
            lambda L, R: len(R) == n)


def _random_objects(rng):
    return [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(rng.choice([1, 2, 3]))]


def build_nlvr2(root: Path, n_sets: dict, size: int, seed: int) -> dict:
    out = {"media_root": str(root / "nlvr2")}
    for split in NLVR2_SPLITS:
        rng = random.Random(f"{seed}-nlvr2-{split}")
        rows = []
        for set_id in range(n_sets[split]):
            sentence, truth = _nlvr2_statement(rng)
            want = [True, False]  # two image pairs per sentence: one true, one false (when reachable)
            rng.shuffle(want)
            for pair in range(2):
                for _ in range(100):  # draw pairs until the wanted truth value comes up
                    left, right = _random_objects(rng), _random_objects(rng)
                    if truth(left, right) == want[pair]:
                        break
                label = truth(left, right)
                ident = f"{split}-{set_id}-{pair}-0"
                folder = root / "nlvr2" / split / (str(set_id % 10) if split == "train" else "")
                for k, objs in enumerate((left, right)):
                    _render(_objects_spec(objs, rng), size, rng, folder / f"{split}-{set_id}-{pair}-img{k}.png", "PNG")
                row = {"identifier": ident, "sentence": sentence, "label": "True" if label else "False",
                       "left_url": "", "right_url": "", "writer": "synthetic", "synset": "shapes", "query": ""}
                if split == "train":
                    row["directory"] = set_id % 10
                rows.append(row)
        path = root / "nlvr2" / f"{split}.json"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[split] = str(path)
    return out


# ---------------------------------------------------------------- retrieval (Karpathy layout)
def build_retrieval(root: Path, n_images: dict, size: int, seed: int) -> dict:
    rng = random.Random(f"{seed}-retrieval")
    images, seen_eval = [], set()
    for split, n in n_images.items():
        k = 0
        while k < n:
            spec = _image_spec(rng)
            if split != "train":  # distinct captions on val/test: each caption has one right image
                if spec["caption"] in seen_eval:
                    continue
                seen_eval.add(spec["caption"])
            name = f"{split}_{k:06d}.jpg"
            _render(spec, size, rng, root / "retrieval" / "images" / name)
            images.append({"filepath": "images", "filename": name, "split": split, "imgid": len(images),
                           "sentences": [{"raw": spec["caption"]}]})
            k += 1
    path = root / "retrieval" / "dataset_shapes.json"
    path.write_text(json.dumps({"dataset": "shapes", "images": images}))
    return {"karpathy": str(path), "media_root": str(root / "retrieval")}


def vocabulary() -> list[str]:
    """Every word the questions, answers and sentences use (for a tokenizer that covers them)."""
    words = set("what colour is the how many shapes are there shape a yes no left has more than right image "
                "both images contain exactly one two three 1 2 3 ?".split())
    words.update(COLOURS, SHAPES, (f"{s}s" for s in SHAPES))
    for place in PLACES:
        words.update(place.split())
    return sorted(words)


def build_task_sets(root: str | Path, seed: int = 0, size: int = 64, vqa_images=(1500, 200), nlvr2_sets=(1200, 150, 150),
                    retrieval_images=(1500, 100, 100)) -> dict:
    """Write all three downstream sets under `root` (reused when already complete for these sizes)."""
    root = Path(root)
    params = {"seed": seed, "size": size, "vqa": list(vqa_images), "nlvr2": list(nlvr2_sets),
              "retrieval": list(retrieval_images), "version": 1}
    manifest = root / "tasks.json"
    if manifest.is_file():
        done = json.loads(manifest.read_text())
        if done.get("params") == params:
            return done["paths"]
    paths = {"vqa": build_vqa(root, dict(zip(VQA_SPLITS, vqa_images)), size, seed),
             "nlvr2": build_nlvr2(root, dict(zip(NLVR2_SPLITS, nlvr2_sets)), size, seed),
             "retrieval": build_retrieval(root, dict(zip(("train", "val", "test"), retrieval_images)), size, seed)}
    manifest.write_text(json.dumps({"params": params, "paths": paths}, indent=1))
    return paths
