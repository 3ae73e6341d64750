"""Fine-tuning end to end on CPU: 2 processes (gloo), DeepSpeed ZeRO-2, from a real 2-rank
pre-training checkpoint, on the shapes world's VQAv2 / NLVR2 / retrieval sets in the real formats.

One torchrun driver runs the three tasks in turn (pipeline.finetune.finetune in-process). It is
SIGKILLed once per task, right after that task's step-4 checkpoint is complete, and started again:
every task must resume at step 4, finish, evaluate its best checkpoint and write its metrics and
predictions. Four launches in all (process start-up dominates on CPU).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
from train_fixtures import REPO, finish, torchrun, kill_tree, read_scalars

TASKS = ("vqa", "nlvr2", "retrieval")
STEPS = 6
IRTR_STEPS = 150
pytestmark = pytest.mark.slow


def _write_inputs(root: Path) -> dict:
    """Task sets, a tokenizer, a short 2-rank pre-training run, and one fine-tuning config per task."""
    from webdataset import TarWriter

    from dataprep.shapes import vocabulary
    from dataprep.shapes_tasks import build_task_sets, vocabulary as task_words
    from pipeline.data import train_tokenizer
    from pipeline.tasks import vqa

    sets = build_task_sets(root / "tasks", vqa_images=(80, 24), nlvr2_sets=(40, 12, 12),
                           retrieval_images=(64, 16, 16))
    train_tokenizer([" ".join(vocabulary() + task_words())] * 8, root / "tok", vocab_size=400)
    r = sets["retrieval"]
    images = [i for i in json.loads(Path(r["karpathy"]).read_text())["images"] if i["split"] == "train"]
    with TarWriter(str(root / "00000.tar")) as sink:
        for i in images:
            sink.write({"__key__": f"{i['imgid']:06d}", "txt": i["sentences"][0]["raw"],
                        "jpg": (Path(r["media_root"]) / i["filepath"] / i["filename"]).read_bytes()})
    (root / "sizes.json").write_text(json.dumps({"00000.tar": len(images)}))
    model = "model: {text: {max_len: 16, layers: 1}, fusion: {layers: 1}, vision: {depth: 1}}\n"
    (root / "pretrain.yaml").write_text(f"""inherit: tiny
{model}data: {{tokenizer: {root}/tok, sources: [{{name: shapes, shards: "{root}/00000.tar"}}], batch_size: 4, workers: 0}}
train: {{steps: 4, warmup_steps: 1, save_every: 4, log_every: 2, output_dir: {root}/pretrain}}
""")
    answers = root / "answers.json"
    v, n = sets["vqa"], sets["nlvr2"]
    answers.write_text(json.dumps(vqa.build_vocab([v["train"]["annotations"]])))
    sections = {
        "vqa": f"{{name: vqa, answers: {answers}, media_root: {v['media_root']}, "
               f"train: {v['train']['annotations']}, train_questions: {v['train']['questions']}, "
               f"val: {v['val']['annotations']}, val_questions: {v['val']['questions']}, test: {v['val']['questions']}}}",
        "nlvr2": f"{{name: nlvr2, media_root: {n['media_root']}, train: {n['train']}, val: {n['dev']}, test: {n['test1']}}}",
        "retrieval": f"{{name: retrieval, media_root: {r['media_root']}, train: {r['karpathy']}, val: {r['karpathy']}, "
                     f"test: {r['karpathy']}}}",
    }
    configs = {}
    for task, section in sections.items():
        loss = "loss: {itc: 1.0, itm: 1.0, mlm: 0.0, scl_vision: 0.0, scl_text: 0.0, itm_negatives: hard}\n" \
            if task == "retrieval" else ""
        configs[task] = root / f"{task}.yaml"
        configs[task].write_text(f"""inherit: tiny
{model}{loss}data: {{tokenizer: {root}/tok, batch_size: 4, workers: 1}}
task: {section}
train: {{steps: {STEPS}, warmup_steps: 1, save_every: 2, eval_every: 3, log_every: 1, keep_last: 1,
        output_dir: {root}/{task}, zero_stage: 2}}
eval: {{batch_size: 8, itm_rerank_k: 4}}
""")
    # retrieval with the released objective (irtr), longer: it must learn
    (root / "irtr.yaml").write_text(f"""inherit: tiny
{model}loss: {{irtr: 1.0, irtr_negatives: 7, itc: 0.5, itm: 0.0, mlm: 0.0, scl_vision: 0.0, scl_text: 0.0}}
data: {{tokenizer: {root}/tok, batch_size: 4, workers: 1}}
task: {sections["retrieval"]}
train: {{steps: {IRTR_STEPS}, warmup_steps: 8, save_every: {IRTR_STEPS}, log_every: 5, output_dir: {root}/irtr,
        zero_stage: 2, head_lr_mult: 2.0}}
eval: {{batch_size: 8, itm_rerank_k: 8, rerank: rank}}
""")
    return {"sets": sets, "configs": configs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    inputs = _write_inputs(root)
    finish(torchrun(["pipeline/pretrain.py", "--config", root / "pretrain.yaml"], root / "pretrain.log"),
            root / "pretrain.log")
    logs = []
    for launch, victim in enumerate((*TASKS, None)):
        log = root / f"launch{launch}.log"
        proc = torchrun([Path(__file__), "--root", root], log)
        logs.append(log)
        if victim is None:
            finish(proc, log, timeout=600)
            break
        done = root / victim / "checkpoints" / "step_00000004" / "complete.json"
        deadline = time.time() + 400
        while not done.exists():
            assert proc.poll() is None, f"launch {launch} ended before {victim}'s step 4:\n{log.read_text()[-5000:]}"
            assert time.time() < deadline, f"launch {launch}: {victim} reached no step-4 checkpoint in time"
            time.sleep(0.05)
        kill_tree(proc)
    return {"root": root, "logs": [p.read_text() for p in logs], **inputs}


def test_every_task_resumed_after_its_kill_and_finished(runs):
    root, logs = runs["root"], runs["logs"]
    for k, task in enumerate(TASKS):
        assert f"resumed from {root / task / 'checkpoints' / 'step_00000004'} at step 4" in logs[k + 1], task
        report = json.loads((root / task / "metrics.json").read_text())
        assert report["steps"] == STEPS and report["task"] == task
        best = json.loads((root / task / "checkpoints" / "best.json").read_text())
        assert best["tag"] == report["weights"] and (root / task / "checkpoints" / best["tag"] / "complete.json").exists()
        tags = set(read_scalars(root / task))
        assert {"loss/total", f"eval/{best['metric'][5:]}"} <= tags, tags
    # the pre-training checkpoint (2 ranks, ZeRO-2) initialised every task
    assert logs[0].count("initialised from") == 1 and f"initialised from {root / 'pretrain'}" in logs[0]


def test_metrics_are_in_range_and_counted_over_the_val_split(runs):
    root, sets = runs["root"], runs["sets"]
    vqa = json.loads((root / "vqa" / "metrics.json").read_text())
    n_val = len(json.loads(Path(sets["vqa"]["val"]["questions"]).read_text())["questions"])
    assert vqa["val"]["n_scored"] == n_val and 0 <= vqa["val"]["vqa_score"] <= 100
    nlvr2 = json.loads((root / "nlvr2" / "metrics.json").read_text())
    assert nlvr2["val"]["n_scored"] == 24 and 0 <= nlvr2["val"]["consistency"] <= nlvr2["val"]["accuracy"] + 50
    ret = json.loads((root / "retrieval" / "metrics.json").read_text())
    assert ret["test"]["n_items"] == 16 and ret["test"]["chance_t2i_r1"] == pytest.approx(100 / 16)
    assert {"itc_r_mean", "itc_itm_r_mean", "itm_r_mean"} <= set(ret["test"])


def test_vqa_predictions_have_the_server_format(runs):
    root, sets = runs["root"], runs["sets"]
    preds = json.loads((root / "vqa" / "predictions.json").read_text())
    questions = json.loads(Path(sets["vqa"]["val"]["questions"]).read_text())["questions"]
    assert sorted(p["question_id"] for p in preds) == sorted(q["question_id"] for q in questions)
    vocab = set(json.loads((root / "answers.json").read_text()))
    for p in preds:
        assert set(p) == {"question_id", "answer"} and isinstance(p["question_id"], int) and p["answer"] in vocab
    nlvr2 = json.loads((root / "nlvr2" / "predictions.json").read_text())
    assert len(nlvr2) == 24 and {p["prediction"] for p in nlvr2} <= {"True", "False"}


def test_irtr_learns_retrieval_above_the_pretrained_starting_point(runs):
    """The released retrieval objective (ranking head from the ITM head, 1 caption + 7 random ones per
    image, + ITC over them) on the shapes world's retrieval set, 2 ranks: after fine-tuning, the ranking
    head's R@k on the held-out test images beats what the pre-trained model gave by ITC + ITM."""
    from pipeline.config import load_config
    from pipeline.finetune import Runner

    root = runs["root"]
    start_cfg = load_config(root / "irtr.yaml", [f"task.init={root / 'pretrain'}", f"train.output_dir={root / 'start'}"])
    runner = Runner(start_cfg)
    start, _ = runner.evaluate_split(runner.make_model(), "test")
    log = root / "irtr.log"
    finish(torchrun([Path(__file__), "--root", root, "--irtr"], log), log, timeout=600)
    report = json.loads((root / "irtr" / "metrics.json").read_text())
    end = report["test"]
    losses = read_scalars(root / "irtr")["loss/irtr"]
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < 0.5 * first and first == pytest.approx(math.log(8), rel=0.25), (first, last)  # chance: ln 8
    assert end["rank_r_mean"] > start["itc_itm_r_mean"] + 15, (start, end)
    assert end["rank_r_mean"] > end["chance_r_mean"] + 30, end


# ---------------------------------------------------------------- the driver (run under torchrun)
def _driver(root: Path, irtr: bool) -> None:
    sys.path.insert(0, str(REPO))
    from pipeline.config import load_config
    from pipeline.finetune import finetune

    for task in ("irtr",) if irtr else TASKS:
        finetune(load_config(root / f"{task}.yaml", [f"task.init={root / 'pretrain'}"]))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--irtr", action="store_true")
    args = parser.parse_args()
    _driver(args.root, args.irtr)
