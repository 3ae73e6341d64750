"""Downstream tasks without training: the readers on the real shared samples, the metrics on
hand-computed cases, the synthetic sets in the real formats, the training loader's bookkeeping."""
import json
import random
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.samples import BadSample
from pipeline.tasks import nlvr2, retrieval as ret_task, vqa
from pipeline.tasks.common import TaskLoader

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DOWN = SHARED / "downstream"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (real sample data lives in ../shared beside the checkout)")
    return path


def _cfg(**task):
    return load_config("tiny", [f"task.{k}={v}" for k, v in task.items()])


# ---------------------------------------------------------------- VQA metric
@pytest.mark.parametrize("raw,norm", [("Two dogs.", "2 dogs"), ("the cat", "cat"), ("dont", "don't"),
                                      ("1,000", "1000"), ("yes!", "yes!"), ("  A  Red\tball ", "red ball"),
                                      ("none", "0"), ("t-shirt", "t-shirt")])
def test_vqa_answer_normalisation(raw, norm):
    assert vqa.normalize_answer(raw) == norm


def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets():
    # 3 humans said "2", 7 said "3": leaving out a "2" leaves 2 matches (2/3), leaving out a "3" leaves 3 (1)
    assert vqa.vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa.vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa.vqa_accuracy("no", ["yes"] + ["no"] * 9) == 1.0
    assert vqa.vqa_accuracy("cat", ["dog"] * 10) == 0.0
    # punctuation of the human answers is processed only when they disagree (the official rule)
    assert vqa.vqa_accuracy("1000", ["1,000"] * 5 + ["10"] * 5) == 1.0
    assert vqa.vqa_accuracy("1000", ["1,000"] * 10) == 0.0
    assert vqa.soft_scores(["net"] * 7 + ["netting", "mesh", "Net"]) == {"net": 1.0, "netting": 1 / 3, "mesh": 1 / 3}


def test_vqa_report_is_overall_and_per_answer_type():
    records = [{"answers": ["yes"] * 10, "answer_type": "yes/no"}, {"answers": ["2"] * 10, "answer_type": "number"},
               {"answers": ["red"] * 10, "answer_type": "other"}, {"answers": None}]
    rep = vqa.accuracy_report({0: "yes", 1: "3", 2: "red", 3: "x"}, records)
    assert rep["vqa_score"] == pytest.approx(200 / 3) and rep["n_scored"] == 3
    assert rep["vqa_score/yes_no"] == 100 and rep["vqa_score/number"] == 0 and rep["vqa_score/other"] == 100


# ---------------------------------------------------------------- VQA readers on the real files
def test_vqa_official_fixture_reader_resolves_images():
    root = need(DOWN / "vqav2" / "official_format_fixture")
    records = vqa.read_official(str(root / "questions.json"), str(root / "annotations.json"), str(root / "images"))
    assert len(records) == 3 and all(len(r["answers"]) == 10 for r in records)
    assert all(Path(r["image"]).is_file() for r in records)
    assert records[0]["question"] == "What is this photo taken looking through?"


def test_vqa_coco239_official_and_albef_readers_agree():
    root = need(DOWN / "vqav2" / "coco239")
    official = vqa.read_official(str(root / "v2_OpenEnded_mscoco_val2014_questions.coco239_answered10.json"),
                                 str(root / "v2_mscoco_val2014_annotations.coco239.json"), str(SHARED / "coco_239" / "images"))
    assert len(official) == 17 and all(Path(r["image"]).is_file() for r in official)  # COCO-2017 file names
    albef = vqa.read_albef(str(root / "vqa_coco239_albef.json"), "/data/coco")
    assert {r["question_id"]: r["answers"] for r in albef} == {r["question_id"]: r["answers"] for r in official}
    assert albef[0]["image"].startswith("/data/coco/val2014/COCO_val2014_")
    # questions without annotations (the test-format file): 46 questions, no answers
    cfg = _cfg(name="vqa", test=root / "v2_OpenEnded_mscoco_val2014_questions.coco239.json",
               media_root=SHARED / "coco_239" / "images")
    test = vqa.read_split(cfg, "test")
    assert len(test) == 46 and all(r["answers"] is None for r in test)


def test_vqa_vocabulary_from_annotations(tmp_path):
    root = need(DOWN / "vqav2")
    vocab = vqa.build_vocab([str(root / "coco239" / "v2_mscoco_val2014_annotations.coco239.json")], top=5)
    assert len(vocab) == 5 and all(v == vqa.normalize_answer(v) for v in vocab)
    shipped = json.loads((root / "vocab" / "lxmert_trainval_label2ans.json").read_text())
    assert len(shipped) == 3129


# ---------------------------------------------------------------- NLVR2
def test_nlvr2_accuracy_and_consistency_by_hand():
    rows = [{"identifier": "dev-1-0-0", "label": True}, {"identifier": "dev-1-1-0", "label": False},
            {"identifier": "dev-1-0-1", "label": True}, {"identifier": "dev-2-0-0", "label": False}]
    # sentence dev-1-*-0 has two pairs: one wrong -> inconsistent; dev-1-*-1 and dev-2-*-0 right
    rep = nlvr2.accuracy_and_consistency({0: True, 1: True, 2: True, 3: False}, rows)
    assert rep["accuracy"] == 75.0 and rep["consistency"] == pytest.approx(200 / 3)
    assert nlvr2.sentence_group("dev-850-3-1") == "dev-850--1"


def test_nlvr2_official_and_albef_readers_on_the_real_rows():
    root = need(DOWN / "nlvr2")
    cfg = _cfg(name="nlvr2", val=root / "rows_with_local_images.jsonl", media_root=root / "images")
    rows = nlvr2.read_split(cfg, "val")
    assert len(rows) == 16 and {r["label"] for r in rows} == {True, False}
    assert all(Path(r["left"]).is_file() and Path(r["right"]).is_file() for r in rows)
    assert rows[0]["identifier"] == "dev-850-0-0" and rows[0]["left"].endswith("dev-850-0-img0.png")
    albef = nlvr2.read_split(_cfg(name="nlvr2", val=root / "nlvr_albef_format_local_images.json", media_root=root), "val")
    assert [(r["sentence"], r["label"]) for r in albef] == [(r["sentence"], r["label"]) for r in rows]
    dev = nlvr2.read_split(_cfg(name="nlvr2", val=root / "dev.json", media_root=root / "images"), "val")
    assert len(dev) == 6982 and sum(r["label"] for r in dev) == 3551


# ---------------------------------------------------------------- retrieval readers
def test_retrieval_readers_on_karpathy_albef_flickr_and_msrvtt(tmp_path):
    coco = need(DOWN / "karpathy_coco" / "coco_karpathy_test.coco239.json")
    items = ret_task.read_albef(str(coco), "/data/coco")
    assert len(items) == 22 and sum(len(i["captions"]) for i in items) == 110
    flickr = need(DOWN / "flickr30k")
    (tmp_path / "flickr30k-images").symlink_to(flickr / "images")
    cfg = _cfg(name="retrieval", test=flickr / "derived" / "flickr30k_test.entities_split.albef_format.json",
               media_root=tmp_path)
    test = ret_task.read_split(cfg, "test")
    assert len(test) == 963 and all(len(i["captions"]) == 5 for i in test)
    local = [i for i in test if Path(i["media"]).is_file()]
    assert [Path(i["media"]).name for i in local] == ["7162685234.jpg"]
    msr = need(SHARED / "annotations" / "msrvtt_jsfusion_test.csv")
    items = ret_task.read_split(_cfg(name="retrieval", test=msr, media_root="/data/msrvtt", modality="video"), "test")
    assert len(items) == 1000 and items[0]["media"] == "/data/msrvtt/video9770.mp4"
    data = need(DOWN / "msrvtt" / "derived" / "MSRVTT_data.excerpt40.json")
    cfg = _cfg(name="retrieval", train=data, train_ids=DOWN / "msrvtt" / "derived" / "MSRVTT_train.9k.csv",
               media_root="/v", modality="video")
    train = ret_task.read_split(cfg, "train")
    assert len({r["media"] for r in train}) == 20 and len(train) == 400  # 20 train videos x 20 captions


# ---------------------------------------------------------------- synthetic sets in the real formats
@pytest.fixture(scope="module")
def task_sets(tmp_path_factory):
    from dataprep.shapes_tasks import build_task_sets

    return build_task_sets(tmp_path_factory.mktemp("tasks"), vqa_images=(60, 20), nlvr2_sets=(20, 10, 10),
                           retrieval_images=(40, 10, 10))


def test_synthetic_sets_read_back_through_the_real_readers(task_sets):
    v = task_sets["vqa"]
    cfg = _cfg(name="vqa", train=v["train"]["annotations"], train_questions=v["train"]["questions"],
               media_root=v["media_root"])
    records = vqa.read_split(cfg, "train")
    assert records and all(Path(r["image"]).is_file() and len(r["answers"]) == 10 for r in records)
    n = task_sets["nlvr2"]
    rows = nlvr2.read_split(_cfg(name="nlvr2", train=n["train"], media_root=n["media_root"]), "train")
    assert len(rows) == 40 and all(Path(r["left"]).is_file() for r in rows)  # the train layout's <directory>/
    assert sum(r["label"] for r in rows) == 20
    r = task_sets["retrieval"]
    cfg = _cfg(name="retrieval", train=r["karpathy"], test=r["karpathy"], media_root=r["media_root"])
    assert len(ret_task.read_split(cfg, "train")) == 40 and len(ret_task.read_split(cfg, "test")) == 10


def test_task_loader_deals_every_record_once_per_epoch_and_replaces_bad_ones():
    records = [{"id": i} for i in range(23)]

    def make(r, rng):
        if r["id"] == 5:
            raise BadSample("corrupt_image", "record 5")
        return {"x": r["id"]}

    collate = lambda s: {"pixels": torch.zeros(len(s), 1, 3, 2, 2), "ids": [x["x"] for x in s]}  # noqa: E731
    loaders = [TaskLoader(records, make, collate, 3, rank, 2, seed=1) for rank in (0, 1)]
    assert len(loaders[0]) == 3  # 23 // (3 x 2)
    seen = [i for ld in loaders for b in ld for i in b["ids"]]
    assert len(seen) == 18 and 5 not in seen and loaders[0].counters().get("corrupt_image", 0) + \
        loaders[1].counters().get("corrupt_image", 0) <= 1
    # resume mid-epoch: the same batches from the saved step on
    a = TaskLoader(records, make, collate, 3, 0, 2, seed=2)
    full = [b["ids"] for b in a]
    b = TaskLoader(records, make, collate, 3, 0, 2, seed=2)
    b.load_state_dict({"epoch": 0, "step": 1})
    assert [x["ids"] for x in b] == full[1:]
    assert a.epoch == 1 and [x["ids"] for x in a] != full  # the next epoch is another order


def test_vqa_prediction_file_has_the_server_format():
    records = [{"question_id": 7, "answers": None}, {"question_id": 9, "answers": None}]
    task = vqa.Task.__new__(vqa.Task)
    out = task.prediction_file({1: "yes", 0: "2"}, records)
    assert out == [{"question_id": 7, "answer": "2"}, {"question_id": 9, "answer": "yes"}]
    assert all(set(o) == {"question_id", "answer"} and isinstance(o["question_id"], int) for o in out)


def test_random_is_not_used_unseeded():
    random.seed(0)  # the loader draws from its own keyed generators, never the global one
    a = TaskLoader([{"id": i} for i in range(8)], lambda r, rng: {"x": rng.random()},
                   lambda s: {"pixels": torch.zeros(len(s), 1, 3, 2, 2), "v": [x["x"] for x in s]}, 2, 0, 1)
    first = [b["v"] for b in a]
    random.seed(123)
    b = TaskLoader([{"id": i} for i in range(8)], lambda r, rng: {"x": rng.random()},
                   lambda s: {"pixels": torch.zeros(len(s), 1, 3, 2, 2), "v": [x["x"] for x in s]}, 2, 0, 1)
    assert [x["v"] for x in b] == first


def test_nlvr2_second_image_has_its_own_token_type():
    """The released recipe: the second image is token type 2, a row that starts as the image row."""
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = nlvr2.NLVR2Model(cfg).eval()
    pretrained = {"fusion.token_type.weight": torch.randn(2, 64)}
    adapted = model.adapt_pretrained(dict(pretrained))["fusion.token_type.weight"]
    assert adapted.shape == (3, 64) and torch.equal(adapted[2], pretrained["fusion.token_type.weight"][1])
    batch = {"text_ids": torch.randint(5, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "pixels": torch.randn(2, 1, 3, 32, 32), "pixels_right": torch.randn(2, 1, 3, 32, 32)}
    with torch.no_grad():
        before = model.logits(batch)
        model.fusion.token_type.weight[2] += 1.0
        after = model.logits(batch)
    assert not torch.allclose(before, after)
