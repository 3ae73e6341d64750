"""Which loss preset `base` should train with: every preset and SCL off, from warmed towers, several seeds.

    python bench/bench_presets.py concept coco shapes --seeds 0 1 2 --write bench/RESULTS.md

The paper's setting starts from pretrained towers (CLIP, RoBERTa); here towers are first warmed by
ITC alone, then each row trains every loss of its preset from those towers:

concept  pipeline.concepts.ConceptTask in process (train_concepts): `--warm` steps of ITC alone, then
         `--steps` of the row's losses from that state (a fresh optimizer); held-out retrieval and ITM
         accuracy (evaluate_concepts).
coco     ../shared/data/coco_239 (200 photos train, 39 held out), the trainer under torchrun (2 ranks,
         DeepSpeed ZeRO-2 bf16): an ITC-only run warms the towers, which are exported in the hubs'
         formats (timm safetensors, RoBERTa save_pretrained) and loaded through model.*.pretrained.
shapes   the demo's corpus (images and videos), the same two stages, then VQAv2 and NLVR2 fine-tuning
         of every row (pipeline.demo.finetune, the shapes world's sets).

Every run prints one JSON line; the tables (mean ± std over seeds, chance and priors beside) go to
stdout and, with --write, replace this benchmark's section of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench_scl import coco_setup, mean_std, read_final_losses, write_section  # noqa: E402
from pipeline.config import load_config  # noqa: E402

ROWS = {  # name -> overrides of the second stage
    "paper": ["loss.preset=paper"],
    "released": ["loss.preset=released"],
    "released_literal": ["loss.preset=released_literal"],
    "light_scl": ["loss.preset=light_scl"],
    "SCL off": ["loss.preset=light_scl", "loss.scl_vision=0", "loss.scl_text=0"],
}
WARM = ["loss.itc=0.5", "loss.itm=0", "loss.mlm=0", "loss.scl_vision=0", "loss.scl_text=0"]
PRIOR = {"triplet": -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3), "swap": math.log(2)}  # ITM loss at the label prior


# ---------------------------------------------------------------- concept task (in process)
def run_concept(seeds, warm: int, steps: int) -> dict:
    from pipeline.concepts import evaluate_concepts, tail_mean, train_concepts

    results = {}
    for seed in seeds:
        warm_cfg = load_config("tiny", [*WARM, f"train.steps={warm}", f"train.warmup_steps={max(1, warm // 20)}"])
        warmed, _, _ = train_concepts(warm_cfg, warm, 32, seed=seed)
        state = {k: v.clone() for k, v in warmed.state_dict().items()}
        for name, overrides in ROWS.items():
            cfg = load_config("tiny", [*overrides, f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 20)}"])
            t0 = time.time()
            model, task, history = train_concepts(cfg, steps, 32, seed=seed, init=state)
            r = {**tail_mean(history), **evaluate_concepts(model, task), "seconds": time.time() - t0,
                 "itm_prior": PRIOR[cfg.loss.itm_pairs]}
            print(json.dumps({"part": "concept", "run": name, "seed": seed, **r}), flush=True)
            results.setdefault(name, []).append(r)
    return results


# ---------------------------------------------------------------- trainer runs (torchrun, 2 ranks)
def _launch(script: str, config: Path, *extra: str, nproc: int = 2) -> None:
    from pipeline.demo import _launch as launch

    launch(script, config, nproc, *extra)


def export_towers(run_dir: Path, config: Path, out: Path) -> list[str]:
    """The warmed towers of a run in the formats the hubs serve: timm safetensors, RoBERTa save_pretrained.
    Returns the overrides that load them."""
    from safetensors.torch import save_file

    from pipeline.train import checkpoint
    from pipeline.model import build_model

    cfg = load_config(config)
    model = build_model(cfg)
    checkpoint.load_fp32(model, checkpoint.consolidate(run_dir, out / "fp32.pt"))
    vision = {k: v.contiguous() for k, v in model.vision.state_dict().items() if k != "temporal_embed"}
    save_file(vision, str(out / "vision.safetensors"))
    model.text.roberta.save_pretrained(out / "text")
    return [f"model.vision.pretrained={out / 'vision.safetensors'}",
            f"model.vision.pretrained_depth={cfg.model.vision.depth}", f"model.text.pretrained={out / 'text'}"]


def _row_config(base: Path, overrides: list[str], path: Path) -> Path:
    """A YAML inheriting `base` with dotted overrides (as the trainer's command line would give them)."""
    from pipeline.config import parse_overrides

    path.write_text(yaml.safe_dump({"inherit": str(base), **parse_overrides(overrides)}, sort_keys=False))
    return path


def run_trainer(part: str, seeds, warm: int, steps: int, out: Path, evals: dict, config: Path, finetune=None) -> dict:
    from pipeline.evaluate import evaluate

    results = {}
    for seed in seeds:
        seed_dir = out / f"seed{seed}"
        warm_run = seed_dir / "warm"
        shutil.rmtree(seed_dir, ignore_errors=True)
        seed_dir.mkdir(parents=True)
        common = [f"train.seed={seed}", f"data.seed={seed}"]
        warm_cfg = _row_config(config, [*WARM, *common, f"train.steps={warm}", f"train.save_every={warm}",
                                         f"train.output_dir={warm_run}"], seed_dir / "warm.yaml")
        _launch("pretrain.py", warm_cfg)
        towers = export_towers(warm_run, warm_cfg, seed_dir)
        for name, overrides in ROWS.items():
            run = seed_dir / name.replace(" ", "_")
            cfg_path = _row_config(config, [*towers, *overrides, *common, f"train.steps={steps}",
                                            f"train.save_every={steps}", f"train.output_dir={run}"],
                                   seed_dir / f"{name.replace(' ', '_')}.yaml")
            t0 = time.time()
            _launch("pretrain.py", cfg_path)
            cfg = load_config(cfg_path)
            r = {"seconds": time.time() - t0, **read_final_losses(run), "itm_prior": PRIOR[cfg.loss.itm_pairs]}
            for ev, (data, modality, folder) in evals.items():
                m = evaluate(str(run), data, cfg, modality, folder)
                r[ev] = {k: v for k, v in m.items() if not isinstance(v, str)}
            if finetune is not None:
                r.update(finetune(cfg_path, cfg))
            print(json.dumps({"part": part, "run": name, "seed": seed, **r}), flush=True)
            results.setdefault(name, []).append(r)
    return results


def shapes_setup(out: Path, steps: int, quick: bool) -> tuple[Path, dict, object]:
    from pipeline import demo

    args = SimpleNamespace(no_scl=False, steps=steps, batch_size=16, lr=5e-4, quick=quick, nproc=2, seed=0,
                           finetune_steps=12 if quick else 300)
    corpus, tok = demo.prepare_data(out, args)  # the demo's corpus and tokenizer, at the demo's sizes
    config = demo.write_config(out, corpus, tok, args)
    evals = {"shapes_images": (corpus["images_eval"], "image", None),
             "shapes_videos": (corpus["videos_eval"], "video", None)}

    def finetune(cfg_path, cfg):
        ft = demo.finetune(out, cfg_path, cfg, args)
        return {"vqa": ft["vqa"]["val"]["vqa_score"], "vqa_chance": ft["vqa"]["chance"],
                "nlvr2": ft["nlvr2"]["val"]["accuracy"], "nlvr2_consistency": ft["nlvr2"]["val"]["consistency"],
                "nlvr2_chance": ft["nlvr2"]["chance"]}
    return config, evals, finetune


# ---------------------------------------------------------------- tables
def table(results: dict, columns: list[tuple[str, object]]) -> str:
    lines = ["| run | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, runs in results.items():
        lines.append(f"| {name} | " + " | ".join(mean_std([get(r) for r in runs]) for _, get in columns) + " |")
    return "\n".join(lines)


def _ret(ev: str, scores: str):
    return lambda r: r[ev][f"{scores}_r_mean"]


def concept_section(results, seeds, warm, steps) -> str:
    cols = [("ITM tail", lambda r: r["itm"]), ("ITM prior", lambda r: r["itm_prior"]),
            ("ITM acc. positives", lambda r: r["itm_acc_pos"]), ("ITM acc. negatives", lambda r: r["itm_acc_neg"]),
            ("ITC tail", lambda r: r["itc"]), ("retrieval ITC", lambda r: r["itc_r_mean"]),
            ("retrieval ITC+ITM", lambda r: r["itc_itm_r_mean"])]
    chance = next(iter(results.values()))[0]["chance_r_mean"]
    return (f"### ConceptTask, tiny, {warm} steps of ITC alone then {steps} steps of the row's losses, batch 32, "
            f"seeds {seeds}\n\n{table(results, cols)}\n\nRetrieval: mean R@1/5/10 (percent) on 128 held-out "
            f"pairs, chance {chance:.1f}; ITC+ITM re-ranks the ITC top 8. Tails: mean of the last 10% of the steps.")


def trainer_section(part, results, seeds, warm, steps, evals) -> str:
    cols = [("ITM tail", lambda r: r.get("itm")), ("ITM prior", lambda r: r["itm_prior"]),
            ("ITC tail", lambda r: r.get("itc"))]
    chances = []
    for ev in evals:
        cols += [(f"{ev} ITC", _ret(ev, "itc")), (f"{ev} ITC+ITM", _ret(ev, "itc_itm"))]
        first = next(iter(results.values()))[0][ev]
        chances.append(f"{ev} {first['chance_r_mean']:.1f} ({first['n_items']} items, {first['n_captions']} captions)")
    if part == "shapes":
        cols += [("VQA", lambda r: r["vqa"]), ("NLVR2", lambda r: r["nlvr2"]),
                 ("NLVR2 consistency", lambda r: r["nlvr2_consistency"])]
        first = next(iter(results.values()))[0]
        chances.append(f"VQA {first['vqa_chance']:.1f}, NLVR2 {first['nlvr2_chance']:.1f}")
    what = {"coco": "COCO-239 (200 photos train, 39 held out)", "shapes": "the shapes world (demo corpus)"}[part]
    return (f"### {what}, tiny, {warm} steps of ITC alone then {steps} steps of the row's losses, 2 ranks x 16, "
            f"DeepSpeed ZeRO-2 bf16, seeds {seeds}\n\n{table(results, cols)}\n\nRetrieval: mean R@1/5/10 "
            f"(percent) on held-out items; chance: {'; '.join(chances)}. Tails: TensorBoard, the last 10% of the steps.")


def publish(text: str, args) -> None:
    text = ("## Loss presets (`bench/bench_presets.py`)\n\n"
            f"    python bench/bench_presets.py {' '.join(args.parts)} --seeds {' '.join(map(str, args.seeds))}\n\n"
            + text)
    print(text)
    if args.write:
        write_section(Path(args.write), args.parts, text, name="bench_presets")


def render_log(log: Path, args) -> None:
    """The sections of an earlier run, from the one JSON line it printed per run (same defaults)."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"part"')]
    sections = []
    for part in args.parts:
        runs = [r for r in lines if r["part"] == part]
        if not runs:
            raise SystemExit(f"{log}: no finished run of {part}")
        results, seeds = {}, sorted({r["seed"] for r in runs})
        for r in runs:
            results.setdefault(r["run"], []).append(r)
        warm = args.warm or 200
        if part == "concept":
            sections.append(concept_section(results, seeds, warm, args.steps or 150))
        else:
            evals = [k for k, v in runs[0].items() if isinstance(v, dict)]
            steps = args.steps or {"coco": 300, "shapes": 250}[part]
            sections.append(trainer_section(part, results, seeds, warm, steps, evals))
    publish("\n\n".join(sections), args)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=["concept", "coco", "shapes"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--warm", type=int, help="ITC-only steps (default: concept 200, coco/shapes 200)")
    ap.add_argument("--steps", type=int, help="steps of each row (default: concept 150, coco 300, shapes 250)")
    ap.add_argument("--quick", action="store_true", help="small corpora and few steps (a smoke run)")
    ap.add_argument("--out", default="runs/bench_presets")
    ap.add_argument("--write", help="replace this benchmark's section of a RESULTS.md")
    ap.add_argument("--from-log", help="draw the tables of PARTS from the JSON lines of an earlier run's output")
    args = ap.parse_args(argv)
    if args.from_log:
        return render_log(Path(args.from_log), args)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.out).resolve()
    sections = []
    for part in args.parts:
        warm = args.warm or (8 if args.quick else 200)
        if part == "concept":
            steps = args.steps or (8 if args.quick else 150)
            sections.append(concept_section(run_concept(args.seeds, warm, steps), args.seeds, warm, steps))
            continue
        steps = args.steps or (8 if args.quick else {"coco": 300, "shapes": 250}[part])
        if part == "coco":
            config, evals = coco_setup(out / part, steps)
            finetune = None
        else:
            config, evals, finetune = shapes_setup(out / part, steps, args.quick)
        config = _row_config(config, ["data.batch_size=16", "data.workers=1", "train.eval_every=0"],
                             out / part / "bench.yaml")
        results = run_trainer(part, args.seeds, warm, steps, out / part, evals, config, finetune)
        sections.append(trainer_section(part, results, args.seeds, warm, steps, evals))
    publish("\n\n".join(sections), args)


if __name__ == "__main__":
    main()
