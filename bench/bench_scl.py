"""The SCL ablation: SCL on vs off (and the choices behind the defaults), several seeds, mean ± std.

    python bench/bench_scl.py concept            # ConceptTask, in-process, tiny (~15 min on 2 cores)
    python bench/bench_scl.py shapes coco        # the embedded default and real COCO photos (~1 h)
    python bench/bench_scl.py concept --seeds 0 1 2 --steps 450 --write bench/RESULTS.md

concept  pipeline.concepts.ConceptTask with pipeline.concepts.train_concepts: the defaults, SCL
         off, and one row per choice the defaults make (the paper's SCL weight, clipping, the
         reference's init std, hard negatives). Tail losses and held-out retrieval.
shapes   the demo's corpus (dataprep: loopback img2dataset + video stage), the trainer itself
         (`pipeline.pretrain.train`, DeepSpeed, one process), retrieval on the held-out images
         and videos.
coco     ../shared/data/coco_239: shards of the first 200 photos with their five captions (one
         drawn per step), evaluated on the other 39 photos (195 captions) it never saw.

Every run prints one JSON line; the tables (mean ± std over seeds, chance beside) go to stdout
and, with --write, replace this benchmark's section of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402

CONCEPT_ROWS = {  # name -> overrides on tiny
    "defaults (SCL 0.1)": [],
    "SCL off": ["loss.scl_vision=0", "loss.scl_text=0"],
    "paper SCL weight 1.0": ["loss.scl_vision=1", "loss.scl_text=1"],
    "grad_clip 1.0": ["train.grad_clip=1.0"],
    "reference init std 0.02": ["model.fusion.init_std=0.02"],
    "hard ITM negatives": ["loss.itm_negatives=hard"],
    "towers at library init": ["model.scratch_init=library"],
    "SCL off, towers at library init": ["model.scratch_init=library", "loss.scl_vision=0", "loss.scl_text=0"],
}
DATA_ROWS = {"SCL on (defaults)": [], "SCL off": ["loss.scl_vision=0", "loss.scl_text=0"]}
LOSSES = ("itc", "itm", "mlm", "scl_vision", "scl_text")


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g} ± {sd:.2g}" if abs(statistics.mean(values)) < 10 else \
        f"{statistics.mean(values):.1f} ± {sd:.1f}"


# ---------------------------------------------------------------- concept task
def run_concept(overrides, seed: int, steps: int) -> dict:
    from pipeline.concepts import evaluate_concepts, tail_mean, train_concepts

    cfg = load_config("tiny", [*overrides, f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 20)}"])
    t0 = time.time()
    model, task, history = train_concepts(cfg, steps, 32, seed=seed)
    return {**tail_mean(history), **evaluate_concepts(model, task), "seconds": time.time() - t0}


def concept_table(results: dict) -> str:
    cols = [*LOSSES, "itc_r_mean", "itc_itm_r_mean", "itm_acc_pos", "itm_acc_neg"]
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, runs in results.items():
        lines.append(f"| {name} | " + " | ".join(mean_std([r.get(c) for r in runs]) for c in cols) + " |")
    chance = results[next(iter(results))][0]["chance_r_mean"]
    return "\n".join(lines) + f"\n\nChance: ITC loss {2 * torch.log(torch.tensor(32.0)):.2f} (batch 32), ITM loss " \
                              f"0.637 (1:2 prior), retrieval mean R@1/5/10 {chance:.1f}."


# ---------------------------------------------------------------- real trainer on shards
def _train_and_eval(config: Path, overrides, seed: int, out: Path, evals: dict) -> dict:
    """pipeline.pretrain.train in this process (DeepSpeed, world size 1), then retrieval per eval set."""
    import shutil

    from pipeline import pretrain
    from pipeline.evaluate import evaluate

    run_dir = out / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(config, [*overrides, f"train.seed={seed}", f"data.seed={seed}", f"train.output_dir={run_dir}"])
    t0 = time.time()
    pretrain.train(cfg)
    result = {"seconds": time.time() - t0, **read_final_losses(run_dir)}
    for name, (data, modality, folder) in evals.items():
        m = evaluate(str(run_dir), data, cfg, modality, folder)
        result[name] = {k: v for k, v in m.items() if not isinstance(v, str)}
    return result


def read_final_losses(run_dir: Path, fraction: float = 0.1) -> dict:
    """Each loss/<term> averaged over the logged windows of the last `fraction` of the steps."""
    from pipeline.train.monitor import read_scalars

    out = {}
    for tag, by_step in read_scalars(run_dir).items():
        if tag.startswith("loss/"):
            last = max(by_step)
            vals = [v for s, v in by_step.items() if s > last * (1 - fraction)]
            out[tag[5:]] = sum(vals) / len(vals)
    return out


def data_table(results: dict, evals) -> str:
    lines = []
    cols = list(LOSSES)
    lines += ["Final training losses (TensorBoard, mean of the last logged window):", "",
              "| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, runs in results.items():
        lines.append(f"| {name} | " + " | ".join(mean_std([r.get(c) for r in runs]) for c in cols) + " |")
    for ev in evals:
        first = results[next(iter(results))][0][ev]
        lines += ["", f"Retrieval on `{ev}` ({first['n_items']} items, {first['n_captions']} captions), percent:", "",
                  "| run | scores | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mean |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, runs in results.items():
            for scores in ("itc", "itc_itm"):
                keys = [f"{scores}_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + [f"{scores}_r_mean"]
                lines.append(f"| {name} | {scores} | " + " | ".join(mean_std([r[ev].get(k) for r in runs])
                                                                  for k in keys) + " |")
        keys = [f"chance_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["chance_r_mean"]
        lines.append("| chance | | " + " | ".join(f"{first[k]:.1f}" for k in keys) + " |")
    return "\n".join(lines)


def shapes_setup(out: Path, steps: int) -> tuple[Path, dict]:
    import yaml

    from dataprep.demo_corpus import build_demo_corpus
    from pipeline.data import train_tokenizer

    corpus = build_demo_corpus(out / "data", seed=0, n_images=4000, n_videos=800, n_eval_images=100,
                               n_eval_videos=60)
    tok = out / "tokenizer"
    if not tok.exists():
        train_tokenizer([" ".join(corpus["vocabulary"])] * 8, tok, vocab_size=400)
    cfg = {"inherit": "tiny", "model": {"text": {"max_len": 16}},
           "data": {"sources": [
               {"name": "shapes", "shards": corpus["images_train"], "modality": "image", "weight": 3.0},
               {"name": "moving_shapes", "shards": corpus["videos_train"], "modality": "video", "weight": 1.0}],
               "tokenizer": str(tok), "batch_size": 32, "workers": 1},
           "train": {"steps": steps, "warmup_steps": max(1, steps // 20), "save_every": steps, "log_every": 10,
                     "zero_stage": 2, "precision": "bf16", "lr": 5e-4, "decay": "cosine"},
           "eval": {"itm_rerank_k": 8}}
    path = out / "shapes.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, {"shapes_images": (corpus["images_eval"], "image", None),
                  "shapes_videos": (corpus["videos_eval"], "video", None)}


def coco_setup(out: Path, steps: int, n_train: int = 200) -> tuple[Path, dict]:
    """Shards of the first `n_train` COCO-239 photos (five captions each); the rest as an eval file."""
    import yaml
    from webdataset import TarWriter

    from pipeline.data import train_tokenizer

    src = SHARED / "coco_239"
    if not (src / "captions.jsonl").exists():
        raise SystemExit(f"{src}/captions.jsonl not found: the coco part needs ../shared/data beside the checkout")
    rows = [json.loads(line) for line in (src / "captions.jsonl").read_text().splitlines() if line.strip()]
    train, test = rows[:n_train], rows[n_train:]
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(0, len(train), 50):
        name = f"{s // 50:05d}.tar"
        with TarWriter(str(shards / name)) as sink:
            for r in train[s:s + 50]:
                sink.write({"__key__": f"{r['coco_id']:012d}", "jpg": (src / r["image"]).read_bytes(),
                            "json": json.dumps({"captions": r["captions"]}).encode()})
        sizes[name] = len(train[s:s + 50])
    (shards / "sizes.json").write_text(json.dumps(sizes))
    eval_file = out / "test.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in test))
    tok = out / "tokenizer"
    if not tok.exists():
        train_tokenizer([c for r in train for c in r["captions"]], tok, vocab_size=2000)
    cfg = {"inherit": "tiny",
           "model": {"vision": {"image_size": 64}, "text": {"max_len": 32, "vocab_size": 2000}},
           "data": {"sources": [{"name": "coco", "shards": f"{shards}/{{00000..{len(sizes) - 1:05d}}}.tar"}],
                    "tokenizer": str(tok), "batch_size": 32, "workers": 1, "image_size": 64},
           "train": {"steps": steps, "warmup_steps": max(1, steps // 20), "save_every": steps, "log_every": 10,
                     "zero_stage": 2, "precision": "bf16", "lr": 5e-4, "decay": "cosine"},
           "eval": {"itm_rerank_k": 16}}
    path = out / "coco.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, {"coco_test": (str(eval_file), "image", str(src))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=["concept", "shapes", "coco"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, help="default: concept 450, shapes 600, coco 600")
    ap.add_argument("--out", default="runs/bench_scl")
    ap.add_argument("--write", help="replace this benchmark's section of a RESULTS.md")
    ap.add_argument("--rows", nargs="+", help="concept: only these rows (names as in CONCEPT_ROWS)")
    args = ap.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sections = []
    for part in args.parts:
        results = {}
        if part == "concept":
            steps = args.steps or 450
            unknown = set(args.rows or ()) - set(CONCEPT_ROWS)
            if unknown:
                raise SystemExit(f"--rows: unknown {sorted(unknown)}; known: {list(CONCEPT_ROWS)}")
            for name, overrides in CONCEPT_ROWS.items():
                if args.rows and name not in args.rows:
                    continue
                for seed in args.seeds:
                    r = run_concept(overrides, seed, steps)
                    print(json.dumps({"part": part, "run": name, "seed": seed, **r}), flush=True)
                    results.setdefault(name, []).append(r)
            sections.append(f"### ConceptTask, tiny, {steps} steps of batch 32, seeds {args.seeds}\n\n"
                            + concept_table(results))
            continue
        steps = args.steps or 600
        out = Path(args.out).resolve() / part
        config, evals = (shapes_setup if part == "shapes" else coco_setup)(out, steps)
        for name, overrides in DATA_ROWS.items():
            for seed in args.seeds:
                r = _train_and_eval(config, overrides, seed, out / name.split()[1].strip("()"), evals)
                print(json.dumps({"part": part, "run": name, "seed": seed, **r}), flush=True)
                results.setdefault(name, []).append(r)
        what = "the embedded default (shapes world)" if part == "shapes" else "COCO-239 (200 photos train, 39 test)"
        sections.append(f"### {what}, tiny, {steps} steps of batch 32, DeepSpeed ZeRO-2 bf16, 1 process, "
                        f"seeds {args.seeds}\n\n" + data_table(results, evals))
    text = "\n\n".join(sections)
    print(text)
    if args.write:
        write_section(Path(args.write), args.parts, text)


def write_section(path: Path, parts, text: str, name: str = "bench_scl") -> None:
    """Replace (or add) the `<!-- NAME:PART -->` blocks of RESULTS.md."""
    content = path.read_text() if path.exists() else "# Benchmark results\n"
    key = "+".join(parts)
    start, end = f"<!-- {name}:{key} -->", f"<!-- /{name}:{key} -->"
    block = f"{start}\n{text}\n{end}"
    if start in content:
        head, rest = content.split(start, 1)
        content = head + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    path.write_text(content)


if __name__ == "__main__":
    main()
