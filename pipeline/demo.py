"""The main job on the embedded default, end to end on a CPU:

  1. dataprep: generate captioned shape images and moving-shape videos, serve them on 127.0.0.1,
     download and shard them (img2dataset; the PyAV video stage), validate;
  2. a caption tokenizer trained on the corpus vocabulary;
  3. pre-training of the `tiny` model with DeepSpeed (bf16, ZeRO-2, 2 processes, images and videos
     mixed), TensorBoard events under <out>/run;
  4. zero-shot retrieval on the held-out images and videos, printed beside chance;
  5. fine-tuning of the pre-trained model on the shapes world's VQAv2 and NLVR2 sets (written in the
     official formats by dataprep), DeepSpeed again, accuracy on their val splits beside chance.

    python -m pipeline.demo                 # a few minutes
    python -m pipeline.demo --no-scl        # the same without the SCL losses
    python -m pipeline.demo --quick         # a short run (CI)
    python -m pipeline.demo --no-finetune   # stop after step 4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_config(out: Path, corpus: dict, tokenizer: Path, args) -> Path:
    run = out / ("run_noscl" if args.no_scl else "run")
    cfg = {
        "inherit": "tiny",
        "model": {"text": {"max_len": 16}},  # the longest synthetic caption is 13 tokens
        "data": {"sources": [
                     {"name": "shapes", "shards": corpus["images_train"], "modality": "image", "weight": 3.0},
                     {"name": "moving_shapes", "shards": corpus["videos_train"], "modality": "video", "weight": 1.0}],
                 "tokenizer": str(tokenizer), "batch_size": args.batch_size, "workers": 1},
        "train": {"output_dir": str(run), "steps": args.steps, "warmup_steps": max(1, args.steps // 20),
                  "save_every": max(1, args.steps // 2), "log_every": max(1, args.steps // 20),
                  "eval_every": max(1, args.steps // 2), "zero_stage": 2, "precision": "bf16",
                  "lr": args.lr, "decay": "cosine", "seed": args.seed},
        "eval": {"data": corpus["images_eval"], "modality": "image", "itm_rerank_k": 8, "batch_size": 64},
    }
    if args.no_scl:
        cfg["loss"] = {"scl_vision": 0.0, "scl_text": 0.0}
    path = out / ("demo_noscl.yaml" if args.no_scl else "demo.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _launch(script: str, config: Path, nproc: int, *extra: str) -> None:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache" / "scl_torch_extensions")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000),
           str(REPO / "pipeline" / script), "--config", str(config), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="everything goes here (data, tokenizer, runs)")
    ap.add_argument("--no-scl", action="store_true", help="switch the SCL losses off")
    ap.add_argument("--quick", action="store_true", help="a small corpus and a short run (CI)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=16, help="per process")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the pre-training and fine-tuning seed (train.seed)")
    ap.add_argument("--no-finetune", action="store_true", help="skip step 5 (VQA and NLVR2 fine-tuning)")
    ap.add_argument("--finetune-steps", type=int)
    args = ap.parse_args(argv)
    args.steps = args.steps or (16 if args.quick else 250)
    args.finetune_steps = args.finetune_steps or (12 if args.quick else 300)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from pipeline.config import load_config

    out = Path(args.out).resolve()
    t0 = time.time()
    corpus, tok_dir = prepare_data(out, args)
    print(f"== 3/5 pre-training: tiny model, {args.steps} steps, DeepSpeed ZeRO-2 bf16, {args.nproc} processes",
          flush=True)
    config = write_config(out, corpus, tok_dir, args)
    run_dir = Path(load_config(config).train.output_dir)
    if run_dir.exists():  # each demo is a fresh run (the trainer would otherwise resume the last one)
        print(f"   removing the previous demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    _launch("pretrain.py", config, args.nproc)
    cfg = load_config(config)
    summary = {"scl": not args.no_scl, "steps": args.steps, "seed": args.seed, "retrieval": zero_shot(cfg, corpus)}
    if not args.no_finetune:
        print(f"== 5/5 fine-tuning: VQAv2 and NLVR2 sets of the shapes world, {args.finetune_steps} steps each",
              flush=True)
        summary["finetune"] = finetune(out, config, cfg, args)
    summary["minutes"] = round((time.time() - t0) / 60, 1)
    (Path(cfg.train.output_dir) / "demo_results.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['minutes']} min. TensorBoard: tensorboard --logdir {cfg.train.output_dir}")
    return summary


def prepare_data(out: Path, args) -> tuple[dict, Path]:
    """Steps 1 and 2: the shapes corpus as shards (reused when done), and a tokenizer of its words."""
    from dataprep.demo_corpus import build_demo_corpus
    from dataprep.shapes_tasks import vocabulary as task_words
    from pipeline.data import train_tokenizer

    print("== 1/5 dataprep: synthetic corpus -> loopback HTTP -> img2dataset / video stage -> shards", flush=True)
    sizes = dict(n_images=300, n_videos=60, n_eval_images=40, n_eval_videos=20) if args.quick else \
        dict(n_images=4000, n_videos=800, n_eval_images=100, n_eval_videos=60)
    corpus = build_demo_corpus(out / "data", seed=0, **sizes)
    for name, rep in corpus["reports"].items():
        print(f"   {name}: {rep['samples']['valid']} valid samples in {rep['shards']['indexed']} shards", flush=True)
    print("== 2/5 tokenizer", flush=True)
    tok_dir = out / "tokenizer"
    train_tokenizer([" ".join(corpus["vocabulary"] + task_words())] * 8, tok_dir, vocab_size=400)
    return corpus, tok_dir


def zero_shot(cfg, corpus: dict) -> dict:
    """Step 4: retrieval on the held-out images and videos, printed beside chance."""
    from pipeline.evaluate import evaluate
    from pipeline.zeroshot import format_metrics

    print("== 4/5 zero-shot retrieval on held-out pairs", flush=True)
    results = {}
    for modality, data in (("image", corpus["images_eval"]), ("video", corpus["videos_eval"])):
        m = evaluate(cfg.train.output_dir, data, cfg, modality)
        results[modality] = m
        print(f"   {modality}-text ({m['n_items']} items, {m['n_captions']} captions): {format_metrics(m)}",
              flush=True)
    return results


def finetune(out: Path, pretrain_config: Path, cfg, args) -> dict:
    """VQA and NLVR2 from the pre-trained run, each printed beside its chance level."""
    from dataprep.shapes_tasks import build_task_sets
    from pipeline.tasks import vqa

    sets = build_task_sets(out / "tasks", seed=0, vqa_images=(400, 100) if args.quick else (2000, 300),
                           nlvr2_sets=(150, 50, 50) if args.quick else (1500, 200, 200))
    answers = out / "tasks" / "answers.json"
    v, n = sets["vqa"], sets["nlvr2"]
    answers.write_text(json.dumps(vqa.build_vocab([v["train"]["annotations"]], top=3129)))
    common = {"inherit": str(pretrain_config), "data": {"batch_size": args.batch_size, "crop_scale": [0.8, 1.0]},
              "eval": {"batch_size": 64}}
    tasks = {
        "vqa": {"task": {"name": "vqa", "answers": str(answers), "media_root": v["media_root"],
                         "train": v["train"]["annotations"], "train_questions": v["train"]["questions"],
                         "val": v["val"]["annotations"], "val_questions": v["val"]["questions"]}},
        "nlvr2": {"task": {"name": "nlvr2", "media_root": n["media_root"], "train": n["train"], "val": n["dev"],
                           "test": n["test1"]}},
    }
    results = {}
    for name, section in tasks.items():
        run = Path(cfg.train.output_dir).parent / f"{Path(cfg.train.output_dir).name}_{name}"
        if run.exists():
            shutil.rmtree(run)
        steps = args.finetune_steps
        ft = {**common, **section, "train": {
            "output_dir": str(run), "steps": steps, "warmup_steps": max(1, steps // 10), "lr": args.lr,
            "head_lr_mult": 1.0, "decay": "cosine", "save_every": max(1, steps // 2),
            "eval_every": max(1, steps // 2), "log_every": max(1, steps // 10), "resume": "auto"}}
        path = out / f"finetune_{name}{'_noscl' if args.no_scl else ''}.yaml"
        path.write_text(yaml.safe_dump(ft, sort_keys=False))
        _launch("finetune.py", path, args.nproc, "--init", cfg.train.output_dir)
        report = json.loads((run / "metrics.json").read_text())
        results[name] = {"val": report["val"], "chance": _chance(name, path)}
        key = "vqa_score" if name == "vqa" else "accuracy"
        print(f"   {name}: val {key} {report['val'][key]:.1f} (chance {results[name]['chance']:.1f})"
              + (f", consistency {report['val']['consistency']:.1f}" if name == "nlvr2" else ""), flush=True)
    return results


def _chance(name: str, config: Path) -> float:
    """The score of the best constant answer: VQA's most frequent training answer, NLVR2's majority label."""
    from pipeline.config import load_config
    from pipeline.tasks import get_task

    cfg = load_config(config)
    module = get_task(name)
    train, val = module.read_split(cfg, "train"), module.read_split(cfg, "val")
    if name == "vqa":
        top = Counter(module.normalize_answer(Counter(r["answers"]).most_common(1)[0][0]) for r in train)
        best = top.most_common(1)[0][0]
        return module.accuracy_report({i: best for i in range(len(val))}, val)["vqa_score"]
    share = sum(r["label"] for r in val) / len(val)
    return 100 * max(share, 1 - share)


if __name__ == "__main__":
    main()
