"""Which scaled_dot_product_attention kernel the vision tower and the fusion actually run.

    python bench/bench_sdpa.py              # base, bf16, one training forward + backward
    python bench/bench_sdpa.py --tiny       # CPU smoke run of the same code

Profiles one training step of the model on a synthetic batch and counts the attention ops by
kernel: flash, memory-efficient, cuDNN, or math (the slow fallback the GPU must avoid). A math
count above 0 on a GPU names a shape or dtype that keeps the fused kernels out.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.concepts import RANDOM_BASE, synthetic_batch  # noqa: E402

KERNELS = {"flash": "_scaled_dot_product_flash_attention", "efficient": "_scaled_dot_product_efficient_attention",
           "cudnn": "_scaled_dot_product_cudnn_attention", "math": "_scaled_dot_product_attention_math"}


def kernel_counts(events) -> dict:
    """{kernel: calls} from profiler events (the CPU flash variant counts as flash)."""
    counts = Counter()
    for e in events:
        for kind, op in KERNELS.items():
            if e.key.startswith(f"aten::{op}") and "backward" not in e.key:
                counts[kind] += e.count
    return dict(counts)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frames", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config("tiny" if args.tiny else "base", [*RANDOM_BASE, *args.overrides])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg).to(device=device, dtype=torch.bfloat16).train()
    batch = {k: (v.to(device, dtype=torch.bfloat16 if v.is_floating_point() else None) if torch.is_tensor(v) else v)
             for k, v in synthetic_batch(cfg, args.batch_size, args.frames).items()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        model(batch)["loss"].backward()
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "config": "tiny" if args.tiny else "base", "frames": args.frames,
              "kernels": kernel_counts(prof.key_averages())}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
