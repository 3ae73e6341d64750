"""Training metrics: a window of per-step sums reduced across ranks, written to TensorBoard and
printed as one console line, both by rank 0 only.

TensorBoard tags (under `<output_dir>/tensorboard`):
    loss/total, loss/<term>        global mean over the window's steps and all ranks
    lr/<group>                     learning rate of each AdamW group at the logged step
    train/grad_norm, train/loss_scale (fp16), train/nonfinite_skipped
    train/cache_drift              contrastive accumulation: each step's largest first- vs second-pass
                                   feature gap, averaged over the window
    temperature/itc, temperature/scl
    throughput/samples_per_s, throughput/tokens_per_s   global (all ranks); tokens = text tokens
                                   (non-padding) + vision tokens (frames x (1 + patches))
    time/data_wait_s, time/compute_s                    per step, mean over ranks
    memory/max_allocated_gib       CUDA only
    data/skipped/<reason>          bad samples skipped by the loader, summed over ranks
    eval/<metric>                  from the evaluation hook
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import distributed


def batch_tokens(batch: dict, patch_size: int) -> int:
    """Text tokens (non-padding) + vision tokens of a batch, counted on the host."""
    b, t, _, h, w = batch["pixels"].shape
    return int(batch["attention_mask"].sum()) + b * t * (1 + (h // patch_size) * (w // patch_size))


class Window:
    """Sums since the last log; `reduce()` (collective) turns them into global metrics."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.losses: dict[str, torch.Tensor] = {}
        self.applied = self.steps = self.samples = self.tokens = 0
        self.data_s = self.compute_s = 0.0
        self.start = time.perf_counter()

    def add_losses(self, losses: dict) -> None:
        for k, v in losses.items():
            self.losses[k] = self.losses.get(k, 0.0) + v
        self.applied += 1

    def add_batch(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def add_step(self, data_s: float, compute_s: float) -> None:
        self.steps += 1
        self.data_s += data_s
        self.compute_s += compute_s

    def reduce(self) -> dict:
        """Global metrics of the window; every rank must call it at the same step."""
        wall = time.perf_counter() - self.start
        names = sorted(self.losses)  # the same on every rank: a skipped micro-batch is skipped everywhere
        local = [self.losses[k].float().to(self.device) for k in names]
        stats = torch.tensor([self.applied, self.samples, self.tokens, self.data_s, self.compute_s, wall],
                             dtype=torch.float64, device=self.device)
        flat = torch.cat([torch.stack(local).double() if local else stats[:0], stats])
        if distributed.is_initialized():
            dist.all_reduce(flat)
        world = distributed.world_size()
        sums, (applied, samples, tokens, data_s, compute_s, wall_sum) = flat[:len(names)], flat[len(names):].tolist()
        out = {f"loss/{'total' if k == 'loss' else k}": (sums[i] / max(applied, 1)).item()
               for i, k in enumerate(names) if k not in ("itc_temperature", "cache_drift")}
        if "itc_temperature" in names:
            out["temperature/itc"] = (sums[names.index("itc_temperature")] / max(applied, 1)).item()
        if "cache_drift" in names:
            out["train/cache_drift"] = (sums[names.index("cache_drift")] / max(applied, 1)).item()
        wall = wall_sum / world
        steps = max(self.steps, 1)
        out.update({"throughput/samples_per_s": samples / wall, "throughput/tokens_per_s": tokens / wall,
                    "time/data_wait_s": data_s / world / steps, "time/compute_s": compute_s / world / steps})
        self.reset()
        return out


def gather_counters(counters: dict) -> dict:
    """Sum {reason: count} dicts over ranks (collective)."""
    if not distributed.is_initialized():
        return dict(counters)
    parts = [None] * distributed.world_size()
    dist.all_gather_object(parts, dict(counters))
    total: dict = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


class Monitor:
    """TensorBoard writer and console printer; a no-op on ranks other than 0."""

    def __init__(self, output_dir, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            self.writer.add_scalar(tag, float(v), step)
        self.writer.flush()

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def console_line(step: int, total: int, m: dict) -> str:
    """One line with the essentials of a metrics dict from the trainer."""
    terms = " ".join(f"{k[5:]} {v:.3f}" for k, v in m.items() if k.startswith("loss/") and k != "loss/total")
    lrs = [v for k, v in m.items() if k.startswith("lr/")]
    step_s = m["time/data_wait_s"] + m["time/compute_s"]
    parts = [f"step {step}/{total}", f"loss {m.get('loss/total', float('nan')):.4f} ({terms})",
             f"lr {max(lrs):.2e}" if lrs else "", f"gnorm {m['train/grad_norm']:.3f}" if "train/grad_norm" in m else "",
             f"{m['throughput/samples_per_s']:.1f} samples/s",
             f"data {m['time/data_wait_s'] / step_s:.0%}" if step_s > 0 else ""]
    if "train/loss_scale" in m:
        parts.append(f"scale {m['train/loss_scale']:.0f}")
    if "memory/max_allocated_gib" in m:
        parts.append(f"mem {m['memory/max_allocated_gib']:.1f} GiB")
    if m.get("train/nonfinite_skipped"):
        parts.append(f"nonfinite skipped {int(m['train/nonfinite_skipped'])}")
    return " | ".join(p for p in parts if p)


def read_scalars(run_dir, files=None) -> dict:
    """{tag: {step: value}} of a run's TensorBoard events, read back with TensorBoard's own
    EventAccumulator (later files win on the same step, as after a resume)."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict = {}
    for f in files or sorted((Path(run_dir) / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out
