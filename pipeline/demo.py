"""The main job on the embedded default, end to end on a CPU:

  1. dataprep: generate captioned shape images and moving-shape videos, serve them on 127.0.0.1,
     download and shard them (img2dataset; the PyAV video stage), validate;
  2. a caption tokenizer trained on the corpus vocabulary;
  3. pre-training of the `tiny` model with DeepSpeed (bf16, ZeRO-2, 2 processes, images and videos
     mixed), TensorBoard events under <out>/run;
  4. zero-shot retrieval on the held-out images and videos, printed beside chance.

    python -m pipeline.demo                 # a few minutes
    python -m pipeline.demo --no-scl        # the same without the SCL losses
    python -m pipeline.demo --quick         # a short run (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
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
                  "lr": args.lr, "decay": "cosine"},
        "eval": {"data": corpus["images_eval"], "modality": "image", "itm_rerank_k": 8, "batch_size": 64},
    }
    if args.no_scl:
        cfg["loss"] = {"scl_vision": 0.0, "scl_text": 0.0}
    path = out / ("demo_noscl.yaml" if args.no_scl else "demo.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def pretrain(config: Path, nproc: int) -> None:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache" / "scl_torch_extensions")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000),
           str(REPO / "pipeline" / "pretrain.py"), "--config", str(config)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="everything goes here (data, tokenizer, runs)")
    ap.add_argument("--no-scl", action="store_true", help="switch the SCL losses off")
    ap.add_argument("--quick", action="store_true", help="a small corpus and a short run (CI)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=16, help="per process")
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args(argv)
    args.steps = args.steps or (16 if args.quick else 250)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from dataprep.pipeline_demo import build_demo_corpus
    from pipeline.config import load_config
    from pipeline.data import train_tokenizer
    from pipeline.evaluate import evaluate
    from pipeline.retrieval import format_metrics

    out = Path(args.out).resolve()
    t0 = time.time()
    print("== 1/4 dataprep: synthetic corpus -> loopback HTTP -> img2dataset / video stage -> shards", flush=True)
    sizes = dict(n_images=300, n_videos=60, n_eval_images=40, n_eval_videos=20) if args.quick else \
        dict(n_images=4000, n_videos=800, n_eval_images=100, n_eval_videos=60)
    corpus = build_demo_corpus(out / "data", seed=0, **sizes)
    for name, rep in corpus["reports"].items():
        print(f"   {name}: {rep['samples']['valid']} valid samples in {rep['shards']['indexed']} shards", flush=True)

    print("== 2/4 tokenizer", flush=True)
    tok_dir = out / "tokenizer"
    train_tokenizer([" ".join(corpus["vocabulary"])] * 8, tok_dir, vocab_size=400)

    print(f"== 3/4 pre-training: tiny model, {args.steps} steps, DeepSpeed ZeRO-2 bf16, {args.nproc} processes",
          flush=True)
    config = write_config(out, corpus, tok_dir, args)
    run_dir = Path(load_config(config).train.output_dir)
    if run_dir.exists():  # each demo is a fresh run (the trainer would otherwise resume the last one)
        print(f"   removing the previous demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    pretrain(config, args.nproc)

    print("== 4/4 zero-shot retrieval on held-out pairs", flush=True)
    cfg = load_config(config)
    results = {}
    for modality, data in (("image", corpus["images_eval"]), ("video", corpus["videos_eval"])):
        m = evaluate(cfg.train.output_dir, data, cfg, modality)
        results[modality] = m
        print(f"   {modality}-text ({m['n_items']} items, {m['n_captions']} captions): {format_metrics(m)}",
              flush=True)
    summary = {"scl": not args.no_scl, "steps": args.steps, "minutes": round((time.time() - t0) / 60, 1),
               "retrieval": results}
    (Path(cfg.train.output_dir) / "demo_results.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['minutes']} min. TensorBoard: tensorboard --logdir {cfg.train.output_dir}")
    return summary


if __name__ == "__main__":
    main()
