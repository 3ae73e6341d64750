"""Step time of the fused SCL schedule against the naive one (one full forward per objective).

Both run side by side in one process on the same batch and weights; the ratio is what matters.

    python bench/bench_schedule.py [--configs tiny mid] [--steps 10] [--frames 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.concepts import synthetic_batch  # noqa: E402

# A mid-size model that still fits a CPU: ViT-S-like towers at 128px.
MID = ["model.vision.width=384", "model.vision.depth=6", "model.vision.heads=6", "model.vision.patch_size=16",
       "model.vision.image_size=128", "model.text.hidden=384", "model.text.layers=6", "model.text.heads=6",
       "model.text.intermediate=1536", "model.text.vocab_size=8000", "model.fusion.hidden=384",
       "model.fusion.layers=2", "model.fusion.heads=6"]


def step_times(model, batch, steps: int) -> dict:
    """Median seconds per forward+backward of each schedule; the schedules take turns step by step,
    so a change in the machine's load hits both alike."""
    times = {"fused": [], "naive": []}
    for i in range(steps + 1):
        for schedule in times:
            model.loss_cfg.schedule = schedule
            t0 = time.perf_counter()
            model(batch)["loss"].backward()
            model.zero_grad(set_to_none=True)
            if i:  # the first round warms up allocators and kernels
                times[schedule].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "mid"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--frames", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    print(f"{'config':6} {'T':>2} {'fused s/step':>13} {'naive s/step':>13} {'naive/fused':>12}")
    for name in args.configs:
        cfg = load_config("tiny", MID if name == "mid" else [])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        for frames in args.frames:
            batch = synthetic_batch(cfg, batch_size=args.batch, frames=frames, text_len=cfg.model.text.max_len)
            t = step_times(model, batch, args.steps)
            fused, naive = t["fused"], t["naive"]
            print(f"{name:6} {frames:>2} {fused:>13.4f} {naive:>13.4f} {naive / fused:>11.2f}x", flush=True)


if __name__ == "__main__":
    main()
