"""DeepSpeed engine overhead and ZeRO memory, side by side in one run.

    torchrun --nproc_per_node 2 bench/bench_engine.py [--steps 5] [--batch-size 4] [--parts time,memory]

Part 1, step time on the same model and batch (tiny config): a plain PyTorch loop (DDP, torch AdamW
with the same parameter groups and schedule, autocast in the same precision, gradient clipping)
against the DeepSpeed engine at ZeRO 0..3. All five loops take their steps in turn; forward,
backward and optimizer step are timed apart; the first round is a warm-up.

Part 2, peak memory per rank while training a mid-size model at ZeRO 0..3 (and the plain loop),
as ratios to ZeRO-0. Each variant runs in fresh processes (one per rank, started by the ranks of
this run), so none inherits the heap another one freed, and takes one throwaway step on the tiny
model before its base is read, so one-time imports and set-up stay out. Two figures, both above
the level before the mid-size model was built, for two training steps after it was wrapped:
  held:      CPU: resident memory (RSS; free heap pages are returned with malloc_trim before the
             base and at the start); CUDA: torch.cuda.max_memory_reserved.
  allocated: CPU: bytes malloc has handed out and not taken back (glibc mallinfo2: in-use heap
             chunks + mmapped blocks), i.e. without the freed memory glibc keeps for reuse;
             CUDA: torch.cuda.max_memory_allocated.
On CPU both are sampled every 2 ms by a thread; the table also gives the freed bytes glibc still
keeps at the end. For ZeRO-3 the script reports the most parameter elements that were gathered
(unpartitioned) at once.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline import distributed  # noqa: E402
from pipeline.train import engine as engine_lib  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.concepts import synthetic_batch  # noqa: E402

# ~25M parameters: model states dominate memory, and a bf16 step still runs on a CPU.
MID = ["model.vision.width=384", "model.vision.depth=4", "model.vision.heads=6", "model.vision.patch_size=16",
       "model.vision.image_size=32", "model.text.hidden=384", "model.text.layers=4", "model.text.heads=6",
       "model.text.intermediate=1536", "model.text.vocab_size=8000", "model.fusion.hidden=384",
       "model.fusion.layers=2", "model.fusion.heads=6", "data.image_size=32"]
VARIANTS = ["torch", "zero0", "zero1", "zero2", "zero3"]


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _return_freed_memory_to_the_os() -> None:
    """CPU: a fixed mmap threshold makes glibc unmap every large freed block at once (its default
    threshold rises after each free of a large block, and later blocks of that size stay in the heap)."""
    try:
        _libc().mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except AttributeError:
        pass


def _trim_heap() -> None:
    """Give the free pages glibc holds back to the OS (malloc_trim), so the resident size at the
    start of a window is the memory in use there, not what building the model left behind."""
    try:
        _libc().malloc_trim(0)
    except AttributeError:
        pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo() -> _MallInfo2 | None:
    """glibc's malloc statistics over all arenas (glibc >= 2.33), else None."""
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc else None
    if fn is None:
        return None
    fn.restype = _MallInfo2
    return fn()


def _malloc_in_use() -> int | None:
    """Bytes malloc has handed out and not taken back (heap chunks in use + mmapped blocks)."""
    m = _mallinfo()
    return None if m is None else m.uordblks + m.hblkhd


def _malloc_kept_free() -> int | None:
    """Freed bytes glibc keeps in its arenas for reuse: resident, but allocated to nothing."""
    m = _mallinfo()
    return None if m is None else m.fordblks


class PeakMemory:
    """Peak memory of this process while training, above the level before the model was built
    (model states + activations + buffers; the transient of building and wrapping is left out):
    `held` (CPU: resident; CUDA: reserved by the caching allocator) and `allocated` (CPU: malloc's
    bytes in use; CUDA: max_memory_allocated). `gathered` (set `params`): the most elements of
    ZeRO-3-partitioned parameters that were gathered at once."""

    def __init__(self):
        gc.collect()
        self.cuda = torch.cuda.is_available()
        self.params: list = []
        self.gathered = 0
        self.kept_free = self.base_free = None
        if self.cuda:
            torch.cuda.synchronize()
            self.base = (torch.cuda.memory_reserved(), torch.cuda.memory_allocated())
        else:
            _trim_heap()
            self.base = self._now()
            self.base_free = _malloc_kept_free()
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _now(self) -> tuple:
        return self._rss(), _malloc_in_use()

    def _gathered_now(self) -> int:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        return sum(p.ds_numel for p in self.params
                   if p.ds_status == ZeroParamStatus.AVAILABLE and not getattr(p, "ds_persist", False))

    def _update(self) -> None:
        if not self.cuda:
            self.peak = [max(p, n) if n is not None else None for p, n in zip(self.peak, self._now())]
        if self.params:
            self.gathered = max(self.gathered, self._gathered_now())

    def _sample(self):
        while not self._stop.wait(0.002):
            self._update()

    def start(self) -> None:
        """Call once the engine is built: the peak is tracked from here."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _trim_heap()
            self.peak = list(self._now())
        self._thread.start()

    def stop(self) -> dict:
        """{"held", "allocated", "kept_free" (CPU: freed bytes glibc keeps, at the end): bytes above the
        base, or None where not known; "gathered": elements}."""
        self._stop.set()
        self._thread.join()
        self._update()
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = [torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()]
        elif self.base_free is not None:
            self.kept_free = _malloc_kept_free() - self.base_free
        held, alloc = (p - b if p is not None and b is not None else None for p, b in zip(self.peak, self.base))
        return {"held": held, "allocated": alloc, "kept_free": self.kept_free, "gathered": self.gathered}


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


def _mid_size() -> tuple[int, dict]:
    """Parameters of the mid-size model and the DeepSpeed settings scaled to it."""
    n_params = sum(p.numel() for p in build_model(load_config("tiny", MID)).parameters())
    # The shipped buckets (5e7 elements) and ZeRO-3 live/reuse limits (DeepSpeed's 1e9) are sized for
    # the base model; scaled to this model (1/8 of it) they keep the same role.
    bucket = n_params // 8
    return n_params, {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                      "stage3_prefetch_bucket_size": bucket, "stage3_max_live_parameters": bucket,
                      "stage3_max_reuse_distance": bucket}


def measure_one(variant: str, common: list, device) -> dict:
    """Peak memory of two training steps of `variant` in this process (max over ranks), in bytes."""
    _, scaled = _mid_size()
    # A throwaway step on the tiny model first: imports and set-up done once per process fall before
    # the base (DeepSpeed's ZeRO path imports torch._inductor through its Muon module, ~35 MiB of
    # Python objects that a later model would not pay again).
    loop, batch = build(variant, common, 2, device, zero_overrides=scaled)
    timed_step(loop, batch)
    del loop, batch
    mem = PeakMemory()
    loop, batch = build(variant, common + MID, 2, device, zero_overrides=scaled)
    if variant == "zero3":
        mem.params = list(loop.engine.module.parameters())
    mem.start()
    for _ in range(2):
        timed_step(loop, batch)
    got = mem.stop()
    keys = [k for k in ("held", "allocated", "kept_free", "gathered") if got[k] is not None]
    return dict(zip(keys, _max_over_ranks([float(got[k]) for k in keys])))


def _in_fresh_processes(variant: str, args) -> dict | None:
    """Run `measure_one(variant)` in a new process on every rank (its own process group on a new
    port), so its heap starts empty: in one long process, a variant reuses the memory an earlier
    one freed and its resident size comes out too low. The result on rank 0, None elsewhere."""
    port = [0]
    if distributed.rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = [s.getsockname()[1]]
    dist.broadcast_object_list(port, src=0)
    env = dict(os.environ, MASTER_PORT=str(port[0]))
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # the child's rank 0 hosts its own store
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peak.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-variant", variant,
                        "--memory-out", str(out)], env=env, check=True, timeout=args.child_timeout)
        dist.barrier()
        return json.loads(out.read_text()) if distributed.rank() == 0 else None


def peak_memory(args, say) -> None:
    n_params, scaled = _mid_size()
    say(f"\n## Peak memory per rank, mid-size model ({n_params / 1e6:.1f}M parameters, batch 2, 2 steps, "
        f"buckets and ZeRO-3 live parameters {scaled['reduce_bucket_size'] / 1e6:.1f}M elements; "
        "each variant in fresh processes)\n")
    rows = {v: _in_fresh_processes(v, args) for v in VARIANTS}
    if distributed.rank() != 0:
        return
    n = distributed.world_size()
    # bytes per parameter: bf16 weights + bf16 grads + fp32 master, momentum, variance (2 + 2 + 12);
    # the plain loop keeps fp32 weights, grads and DDP's gradient buckets (4 + 4 + 4) + AdamW (8).
    states = {"torch": 20, "zero0": 16, "zero1": 4 + 12 / n, "zero2": 2 + 14 / n, "zero3": 16 / n}
    cuda = torch.cuda.is_available()
    say(f"| loop | peak {'reserved' if cuda else 'resident (RSS)'}, MiB | ratio to ZeRO-0 | peak allocated, MiB "
        "| ratio to ZeRO-0 | kept free by malloc at the end, MiB | model states by the ZeRO paper's count, MiB |")
    say("|---|---|---|---|---|---|---|")
    mib = 2**20

    def cell(r, key, ratio=True):
        if key not in r:
            return "- | -" if ratio else "-"
        return f"{r[key] / mib:.0f}" + (f" | {r[key] / rows['zero0'][key]:.2f}" if ratio else "")

    for v in VARIANTS:
        r = rows[v]
        say(f"| {_label(v)} | {cell(r, 'held')} | {cell(r, 'allocated')} | {cell(r, 'kept_free', False)} "
            f"| {states[v] * n_params / mib:.0f} |")
    say(f"\nZeRO-3: at most {rows['zero3']['gathered'] / 1e6:.2f}M of {n_params / 1e6:.2f}M parameter elements "
        f"gathered at once (stage3_max_live_parameters {scaled['stage3_max_live_parameters'] / 1e6:.2f}M)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--parts", default="time,memory", help="comma-separated: time, memory")
    p.add_argument("--child-timeout", type=float, default=1800, help="seconds for one memory variant")
    p.add_argument("--memory-variant", help=argparse.SUPPRESS)  # internal: one variant, in a fresh process
    p.add_argument("--memory-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _return_freed_memory_to_the_os()
    env = engine_lib.init_distributed()
    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    common = ["train.precision=bf16", "train.warmup_steps=2", "train.steps=100"]
    if args.memory_variant:
        got = measure_one(args.memory_variant, common, device)
        if env.rank == 0:
            Path(args.memory_out).write_text(json.dumps(got))
        return
    say = print if env.rank == 0 else (lambda *a, **k: None)
    say(f"# {env.world_size} ranks, {device.type}, bf16, batch {args.batch_size}/rank, "
        f"median of {args.steps} steps after a warm-up")

    if "time" in args.parts:
        step_times(args, common, device, say)
    if "memory" in args.parts:
        peak_memory(args, say)


if __name__ == "__main__":
    main()
