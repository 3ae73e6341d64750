"""Contrastive accumulation (`train.contrastive_accum`) against plain gradient accumulation.

    torchrun --nproc_per_node 2 bench/bench_accum.py speed [--accum 4] [--batch-size 8] [--steps 6] [--size mid]
    python bench/bench_accum.py learn [--seeds 0 1 2] [--steps 450] [--write bench/RESULTS.md]

speed  The same batches through two DeepSpeed engines (bf16, ZeRO-2) built from the same weights,
       one optimizer step (A micro-batches) in turn: plain accumulation, contrastive accumulation,
       and the A x B pairs as one micro-batch (the large batch it stands in for). Prints negatives per contrastive loss, step time (median over the steps after
       a warm-up, slowest rank) and peak allocated memory per rank above the engine's own (CUDA:
       max_memory_allocated; CPU: malloc's bytes in use, bench_engine's measure), each as a ratio
       to plain accumulation.
learn  ConceptTask (pipeline.concepts), tiny, in process: a batch of 32 in one step, 4 x 8 with
       plain accumulation, 4 x 8 with contrastive accumulation; tail losses and held-out retrieval,
       mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402

LEARN_ROWS = {  # name -> (micro-batch, overrides)
    "1 x 32, no accumulation": (32, ["train.grad_accum=1"]),
    "4 x 8, plain accumulation": (8, ["train.grad_accum=4"]),
    "4 x 8, contrastive accumulation": (8, ["train.grad_accum=4", "train.contrastive_accum=true"]),
}


# ---------------------------------------------------------------- speed and memory (torchrun)
def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def speed(args) -> None:
    from bench_engine import MID, PeakMemory

    from pipeline import distributed
    from pipeline.train import engine as engine_lib
    from pipeline.model import build_model
    from pipeline.concepts import RANDOM_BASE, synthetic_batch

    env = engine_lib.init_distributed()
    a, b, world = args.accum, args.batch_size, env.world_size
    overrides = (MID if args.size == "mid" else []) + [*RANDOM_BASE,
        "train.zero_stage=2", "train.precision=bf16", f"data.batch_size={b}", f"train.grad_accum={a}",
        "train.warmup_steps=0", f"train.steps={args.steps + 1}"]
    cfgs = {v: load_config(args.config, overrides + [f"train.contrastive_accum={v == 'cached'}"])
            for v in ("plain", "cached")}
    # the batch contrastive accumulation stands in for: A x B pairs in one micro-batch
    cfgs["large"] = load_config(args.config, overrides + [f"data.batch_size={a * b}", "train.grad_accum=1"])
    cfg = cfgs["plain"]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    groups = [[engine_lib.to_device(synthetic_batch(cfg, b, seed=10_000 * r + 100 * i + env.rank), device,
                                    torch.bfloat16) for i in range(a)] for r in range(args.steps + 1)]

    def step(engine, variant, group):
        if variant == "cached":
            assert engine_lib.train_group_step(engine, group, cfg.loss).applied
        elif variant == "large":
            assert engine_lib.train_micro_step(engine, {k: torch.cat([g[k] for g in group]) for k in group[0]}).applied
        else:
            for batch in group:
                assert engine_lib.train_micro_step(engine, batch).applied

    def build(variant):
        torch.manual_seed(0)
        return engine_lib.initialize(build_model(cfgs[variant]), cfgs[variant])

    # memory: one engine at a time, two steps each, after a warm-up engine took the process's
    # one-time costs (comm buffers, lazy set-up); each variant's lowest over its runs
    warm = build("cached")
    step(warm, "cached", groups[0])
    step(warm, "plain", groups[0])
    del warm
    peak = {}
    for variant in args.order.split(","):
        engine = build(variant)
        mem = PeakMemory()
        mem.start()
        for group in groups[:2]:
            step(engine, variant, group)
        got = mem.stop()
        peak[variant] = min(peak.get(variant, float("inf")), got["allocated"] if got["allocated"] is not None
                            else got["held"])
        del engine
    # time: both engines, the steps in turn on the same batches
    engines = {v: build(v) for v in ("plain", "cached", "large")}
    times = {v: [] for v in engines}
    for r, group in enumerate(groups):
        for variant, engine in engines.items():
            t = _now()
            step(engine, variant, group)
            if r > 0:
                times[variant].append(_now() - t)
    med = {v: torch.tensor(statistics.median(t) * 1e3, dtype=torch.float64, device=device) for v, t in times.items()}
    mib = {v: torch.tensor(p / 2**20, dtype=torch.float64, device=device) for v, p in peak.items()}
    for t in (*med.values(), *mib.values()):
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    if distributed.is_main():
        n_params = sum(p.numel() for p in build_model(cfg).parameters())
        where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
        print(f"\n## Contrastive accumulation vs plain accumulation ({where}; {world} ranks, bf16 ZeRO-2, "
              f"{n_params / 1e6:.1f}M parameters, {a} x {b} per rank, {args.steps} timed steps)\n")
        print("| accumulation | negatives per contrastive loss | step ms (median, slowest rank) | vs plain "
              "| peak allocated MiB per rank | vs plain |")
        print("|---|---|---|---|---|---|")
        names = {"plain": f"plain, {a} x {b}", "cached": f"contrastive, {a} x {b}", "large": f"none, 1 x {a * b}"}
        for v, negatives in (("plain", b * world), ("cached", a * b * world), ("large", a * b * world)):
            memory = (f"{mib[v].item():.0f} | {mib[v].item() / max(mib['plain'].item(), 1e-9):.2f}x" if v in mib
                      else "- | -")  # only the variants of --order are measured
            print(f"| {names[v]} | {negatives} | {med[v].item():.0f} | "
                  f"{med[v].item() / med['plain'].item():.2f}x | {memory} |")
        print(json.dumps({"step_ms": {v: t.item() for v, t in med.items()},
                          "peak_mib": {v: t.item() for v, t in mib.items()}}))


# ---------------------------------------------------------------- learning (in process)
def learn(args) -> None:
    from bench_scl import mean_std, write_section

    from pipeline.concepts import evaluate_concepts, tail_mean, train_concepts

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    results = {}
    for name, (micro, overrides) in LEARN_ROWS.items():
        for seed in args.seeds:
            cfg = load_config("tiny", [*overrides, f"train.steps={args.steps}",
                                       f"train.warmup_steps={max(1, args.steps // 20)}"])
            t0 = time.time()
            model, task, history = train_concepts(cfg, args.steps, micro, seed=seed)
            r = {**tail_mean(history), **evaluate_concepts(model, task), "seconds": time.time() - t0}
            print(json.dumps({"run": name, "seed": seed, **r}), flush=True)
            results.setdefault(name, []).append(r)
    cols = ["itc", "scl_vision", "scl_text", "itm", "itc_r_mean", "itc_itm_r_mean", "seconds"]
    lines = [f"### ConceptTask, tiny, {args.steps} steps of 32 pairs, seeds {args.seeds}\n",
             "| run | contrastive negatives | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, runs in results.items():
        negatives = 8 if "plain" in name else 32
        lines.append(f"| {name} | {negatives} | " + " | ".join(mean_std([r.get(c) for r in runs]) for c in cols) + " |")
    chance = results[next(iter(results))][0]["chance_r_mean"]
    text = "\n".join(lines) + (f"\n\nLosses: mean of the last 10% of the steps (ITC chance: {2 * torch.log(torch.tensor(8.0)):.2f}"
                               f" over 8 rows, {2 * torch.log(torch.tensor(32.0)):.2f} over 32). Retrieval: mean "
                               f"R@1/5/10 in percent on 128 held-out pairs; chance {chance:.1f}. seconds: wall clock of the run.")
    print(text)
    if args.write:
        write_section(Path(args.write), ["accum"], text, name="bench_accum")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["speed", "learn"])
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--config", default="tiny", help="speed: the model's config (base on a GPU)")
    ap.add_argument("--size", choices=["config", "mid"], default="config",
                    help="speed: mid = bench_engine's ~25M-parameter model on top of --config")
    ap.add_argument("--order", default="plain,cached,large,plain,cached,large",
                    help="speed: the memory runs, in turn (each variant's lowest counts)")
    ap.add_argument("--steps", type=int, help="default: speed 6, learn 450")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=0, help="learn: torch threads (0: one per core)")
    ap.add_argument("--write", help="learn: replace this benchmark's section of a RESULTS.md")
    args = ap.parse_args(argv)
    if args.part == "speed":
        args.steps = args.steps or 6
        speed(args)
    else:
        args.steps = args.steps or 450
        learn(args)


if __name__ == "__main__":
    main()
