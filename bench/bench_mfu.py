"""Model FLOPs utilisation of pre-training: base config, bf16, ZeRO-2, synthetic batches.

    deepspeed --num_gpus 1 bench/bench_mfu.py [--steps 300] [--batch-size 32] [section.key=value ...]
    python bench/bench_mfu.py --tiny --steps 4 --warmup 1     # CPU smoke run of the same code

FLOPs per sample are counted here, by torch.utils.flop_counter over one forward + backward of the
model on the benchmark batch (every matmul and attention of the fused schedule, all passes), divided
by the batch size. MFU = FLOPs per sample x samples/s per device / peak, where the peak is measured
on this device: the best rate of large bf16 matmuls. (On a CPU without native bf16 the figure
only shows that the script runs.)
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.train import engine as engine_lib  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.concepts import RANDOM_BASE, synthetic_batch  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measured_bf16_peak(device, sizes, reps: int = 5) -> float:
    """Best bf16 matmul rate (FLOP/s) over square products of the given sizes on `device`."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(reps + 1):
            _sync()
            t = time.perf_counter()
            a @ b
            _sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def flops_per_sample(model, batch: dict, device) -> float:
    """Forward + backward FLOPs of one training step on `batch`, per sample (bf16 autocast)."""
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(batch)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["pixels"].shape[0]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke run)")
    p.add_argument("--steps", type=int, default=300, help="timed steps")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=32, help="per device")
    p.add_argument("--frames", type=int, default=1, help="1 = images; >1 = videos at data.video_size")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    env = engine_lib.init_distributed()
    cfg = load_config("tiny" if args.tiny else "base",
                      [*RANDOM_BASE, "train.precision=bf16", "train.zero_stage=2", f"data.batch_size={args.batch_size}",
                       f"train.steps={args.warmup + args.steps}", "train.warmup_steps=10", *args.overrides])
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    size = cfg.data.video_size if args.frames > 1 else cfg.data.image_size
    batch = synthetic_batch(cfg, batch_size=args.batch_size, frames=args.frames, text_len=cfg.model.text.max_len,
                            seed=env.rank, size=size)

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(device)
    per_sample = flops_per_sample(model, engine_lib.to_device(batch, device, torch.float32), device)
    peak = measured_bf16_peak(device, (4096, 8192, 16384) if device.type == "cuda" else (128, 256, 512))
    engine = engine_lib.initialize(model, cfg)
    batch = engine_lib.to_device(batch, engine.device, engine_lib.compute_dtype(engine))

    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            _sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        engine_lib.train_micro_step(engine, batch)
    _sync()
    elapsed = time.perf_counter() - start

    per_device = args.batch_size * args.steps / elapsed
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "config": "tiny" if args.tiny else "base", "world_size": env.world_size, "batch_per_device": args.batch_size,
        "frames": args.frames, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops_per_sample": per_sample / 1e9, "samples_per_s": per_device * env.world_size,
        "measured_bf16_peak_tflops": peak / 1e12, "mfu": per_sample * per_device / peak,
        "peak_memory_gib": (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
    }
    if env.rank == 0:
        for k, v in result.items():
            print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
        print(f"| {result['device']} | {result['config']} | {env.world_size} | {args.batch_size} | "
              f"{result['gflops_per_sample']:.1f} | {result['samples_per_s']:.1f} | "
              f"{result['measured_bf16_peak_tflops']:.1f} | {100 * result['mfu']:.1f}% | "
              f"{result['peak_memory_gib']:.1f} |")
    return result


if __name__ == "__main__":
    main()
