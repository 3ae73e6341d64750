"""DeepSpeed engine overhead and ZeRO memory, side by side in one run.

    torchrun --nproc_per_node 2 bench/bench_engine.py [--steps 5] [--batch-size 4] [--parts time,memory]

Part 1, step time on the same model and batch (tiny config): a plain PyTorch loop (DDP, torch AdamW
with the same parameter groups and schedule, autocast in the same precision, gradient clipping)
against the DeepSpeed engine at ZeRO 0..3. All five loops take their steps in turn; forward,
backward and optimizer step are timed apart; the first round is a warm-up.

Part 2, peak memory per rank while training a mid-size model at ZeRO 0..3 (and the plain loop),
as ratios to ZeRO-0. CUDA: torch.cuda.max_memory_allocated above the level before the model was
built; CPU: peak resident memory above that level, sampled every 2 ms by a thread.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline import distributed, engine as engine_lib  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.synthetic import synthetic_batch  # noqa: E402

# ~25M parameters: model states dominate memory, and a bf16 step still runs on a CPU.
MID = ["model.vision.width=384", "model.vision.depth=4", "model.vision.heads=6", "model.vision.patch_size=16",
       "model.vision.image_size=32", "model.text.hidden=384", "model.text.layers=4", "model.text.heads=6",
       "model.text.intermediate=1536", "model.text.vocab_size=8000", "model.fusion.hidden=384",
       "model.fusion.layers=2", "model.fusion.heads=6", "data.image_size=32"]
VARIANTS = ["torch", "zero0", "zero1", "zero2", "zero3"]


def _return_freed_memory_to_the_os() -> None:
    """CPU: a fixed mmap threshold makes glibc unmap every large freed block, so the resident size
    of one variant does not hide inside memory kept from the previous one (glibc's default threshold
    rises after each free of a large block)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of this process while training, above the level before the model was built
    (model states + activations + buffers; the transient of building and wrapping is left out)."""

    def __init__(self):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak = self.base

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def start(self) -> None:
        """Call once the engine is built: the peak is tracked from here."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()
            self._thread.start()

    def stop(self) -> int:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        return self.peak - self.base


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class TorchLoop:
    """The plain PyTorch baseline: DDP + AdamW (same groups/schedule) + autocast + clipping."""

    def __init__(self, model, cfg, device):
        self.cfg = cfg
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        model = model.to(device)
        self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index]
                                                               if device.type == "cuda" else None)
        self.opt = torch.optim.AdamW(engine_lib.param_groups(model, cfg.train), betas=cfg.train.betas)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: engine_lib.lr_factor(s, cfg.train))
        self.device = device

    def forward(self, batch):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.model(batch)["loss"]

    def backward(self, loss):
        loss.backward()

    def step(self):
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()


class DeepSpeedLoop:
    def __init__(self, model, cfg, zero_overrides: dict):
        ds_config = engine_lib.ds_config_for(cfg, distributed.world_size())
        ds_config["zero_optimization"].update(
            {k: v for k, v in zero_overrides.items() if cfg.train.zero_stage == 3 or not k.startswith("stage3")})
        self.engine = engine_lib.initialize(model, cfg, ds_config)
        self.dtype = engine_lib.compute_dtype(self.engine)

    def forward(self, batch):
        return self.engine(batch)["loss"]

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()


def build(variant: str, overrides: list, batch_size: int, device, zero_overrides=None):
    """(training loop, batch on device) for "torch" or "zero<stage>"; the same weights and batch."""
    stage = "0" if variant == "torch" else variant[4:]
    cfg = load_config("tiny", overrides + [f"train.zero_stage={stage}", f"data.batch_size={batch_size}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    loop = TorchLoop(model, cfg, device) if variant == "torch" else DeepSpeedLoop(model, cfg, zero_overrides or {})
    dtype = torch.float32 if variant == "torch" else loop.dtype
    batch = engine_lib.to_device(synthetic_batch(cfg, batch_size=batch_size, text_len=16,
                                                 seed=distributed.rank()), device, dtype)
    return loop, batch


def timed_step(loop, batch) -> tuple[float, float, float]:
    """Seconds of forward, backward and optimizer step."""
    t0 = _now()
    loss = loop.forward(batch)
    t1 = _now()
    loop.backward(loss)
    t2 = _now()
    loop.step()
    return t1 - t0, t2 - t1, _now() - t2


def _max_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    if distributed.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _label(variant: str) -> str:
    return "plain PyTorch (DDP)" if variant == "torch" else "DeepSpeed " + variant.replace("zero", "ZeRO-")


def step_times(args, common, device, say) -> None:
    """All loops exist at once and take their steps in turn, so load on the machine hits them alike."""
    loops = {v: build(v, common, args.batch_size, device) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for i in range(args.steps + 1):  # round 0 warms up (and allocates torch AdamW's state)
        for v, (loop, batch) in loops.items():
            t = timed_step(loop, batch)
            if i > 0:
                times[v].append(t)
    say("\n## Step time, tiny config (ms per step, median, slowest rank)\n")
    say("| loop | forward | backward | optimizer step | total | step vs torch | total vs torch |")
    say("|---|---|---|---|---|---|---|")
    base = None
    for v in VARIANTS:
        med = [statistics.median(phase) * 1e3 for phase in zip(*times[v])]
        f, b, s, tot = _max_over_ranks(med + [sum(med)])
        base = base or (s, tot)
        say(f"| {_label(v)} | {f:.1f} | {b:.1f} | {s:.1f} | {tot:.1f} | {s / base[0]:.2f}x | {tot / base[1]:.2f}x |")


def peak_memory(common, device, say) -> None:
    n_params = sum(p.numel() for p in build_model(load_config("tiny", MID)).parameters())
    # The shipped buckets (5e7 elements) and ZeRO-3 live/reuse limits (DeepSpeed's 1e9) are sized for
    # the base model; scaled to this model (1/8 of it) they keep the same role.
    bucket = n_params // 8
    scaled = {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket, "stage3_prefetch_bucket_size": bucket,
              "stage3_max_live_parameters": bucket, "stage3_max_reuse_distance": bucket}
    say(f"\n## Peak memory per rank, mid-size model ({n_params / 1e6:.1f}M parameters, batch 2, 2 steps, "
        f"buckets and ZeRO-3 live parameters {bucket / 1e6:.1f}M elements)\n")
    say("| loop | peak MiB (max over ranks) | ratio to ZeRO-0 | model states by the ZeRO paper's count, MiB |")
    say("|---|---|---|---|")
    rows = {}
    for v in VARIANTS:  # one at a time: each peak is measured alone
        mem = PeakMemory()
        loop, batch = build(v, common + MID, 2, device, zero_overrides=scaled)
        mem.start()
        for _ in range(2):
            timed_step(loop, batch)
        rows[v] = _max_over_ranks([mem.stop()])[0] / 2**20
        del loop, batch
        gc.collect()
    n = distributed.world_size()
    # bytes per parameter: bf16 weights + bf16 grads + fp32 master, momentum, variance (2 + 2 + 12);
    # the plain loop keeps fp32 weights, grads and DDP's gradient buckets (4 + 4 + 4) + AdamW (8).
    states = {"torch": 20, "zero0": 16, "zero1": 4 + 12 / n, "zero2": 2 + 14 / n, "zero3": 16 / n}
    for v in VARIANTS:
        say(f"| {_label(v)} | {rows[v]:.0f} | {rows[v] / rows['zero0']:.2f} | {states[v] * n_params / 2**20:.0f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--parts", default="time,memory", help="comma-separated: time, memory")
    args = p.parse_args(argv)
    _return_freed_memory_to_the_os()
    env = engine_lib.init_distributed()
    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    common = ["train.precision=bf16", "train.warmup_steps=2", "train.steps=100"]
    say = print if env.rank == 0 else (lambda *a, **k: None)
    say(f"# {env.world_size} ranks, {device.type}, bf16, batch {args.batch_size}/rank, "
        f"median of {args.steps} steps after a warm-up")

    if "time" in args.parts:
        step_times(args, common, device, say)
    if "memory" in args.parts:
        peak_memory(common, device, say)


if __name__ == "__main__":
    main()
