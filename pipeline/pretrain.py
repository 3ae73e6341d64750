"""Pre-training entry point: DeepSpeed ZeRO training of the SCL model on `cfg.data.sources`.

    deepspeed pipeline/pretrain.py --config tiny [--resume auto] [section.key=value ...]
    deepspeed --num_nodes 2 --hostfile hosts pipeline/pretrain.py --config base
    torchrun --nproc_per_node 8 pipeline/pretrain.py --config base train.zero_stage=3
    srun python pipeline/pretrain.py --config base          # rank/world from SLURM_* variables

In-process (Submitit): `train(load_config(...))`; a preemption handler calls `request_checkpoint()`
and `train` saves at the next step boundary and returns.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Runnable as a file path from the repository root (`deepspeed pipeline/pretrain.py`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline import checkpoint, distributed, engine as engine_lib, retrieval  # noqa: E402
from pipeline.config import Config, dump_config, load_config, to_dict  # noqa: E402
from pipeline.data import build_train_loader  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.monitor import Monitor, Window, batch_tokens, console_line, gather_counters  # noqa: E402

log = logging.getLogger("pipeline.pretrain")

_checkpoint_requested = threading.Event()


def request_checkpoint() -> None:
    """Ask a running `train` to save a checkpoint at the next step boundary and return.

    Safe to call from a signal handler or another thread (it only sets a flag); the ranks agree
    on the flag collectively, so calling it on any one rank is enough.
    """
    _checkpoint_requested.set()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _batches(loader):
    """Batches forever; the loader moves to its next epoch after each pass."""
    while True:
        yield from loader


def _eval_hook(cfg: Config):
    """Retrieval evaluation every `train.eval_every` steps when `eval.data` is set; else None."""
    if not (cfg.eval.data and cfg.train.eval_every > 0):
        return None
    return retrieval.evaluate_during_training


def _engine_metrics(engine, cfg: Config, lrs: dict, skipped: int) -> dict:
    m = {f"lr/{name}": lr for name, lr in lrs.items()}
    norm = engine.get_global_grad_norm()
    if norm is not None:
        m["train/grad_norm"] = float(norm)
    if cfg.train.precision == "fp16":
        m["train/loss_scale"] = float(engine.optimizer.loss_scale)
    m["temperature/scl"] = cfg.loss.scl_temperature
    m["train/nonfinite_skipped"] = skipped
    if torch.cuda.is_available():
        m["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return m


def train(cfg: Config) -> dict:
    """Train to `cfg.train.steps` (or until `request_checkpoint()`); returns a summary dict.

    Collective: every rank of the launch calls it. Rank and world size come from the launcher's
    environment through `pipeline.distributed`.
    """
    tc, out = cfg.train, Path(cfg.train.output_dir)
    # Configuration errors surface before any process group or model exists.
    ds_config = engine_lib.ds_config_for(cfg, distributed.detect().world_size)
    tag_dir = checkpoint.resolve(out, tc.resume)

    env = engine_lib.init_distributed()
    main_rank = env.rank == 0
    seed_everything(tc.seed)  # identical initial weights on every rank
    engine = engine_lib.initialize(build_model(cfg), cfg, ds_config)
    seed_everything(tc.seed + env.rank)  # per-rank ITM negatives and dropout
    loader = build_train_loader(cfg, env.rank, env.world_size)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")

    step, skipped = 0, 0
    if tag_dir is not None:
        state = checkpoint.load(engine, tag_dir)
        step, skipped = state.step, int(state.client_state.get("nonfinite_skipped", 0))
        if state.rank_state is not None:
            loader.load_state_dict(state.rank_state["loader"])
            checkpoint.set_rng_state(state.rank_state["rng"])
        else:
            seed_everything(tc.seed + env.rank + 1_000_003 * step)
        if main_rank:
            print(f"resumed from {tag_dir} at step {step}", flush=True)

    guard = engine_lib.NonFiniteGuard(tc.max_nonfinite, total=skipped)

    def save():
        checkpoint.save(engine, out, step, {"config": to_dict(cfg), "nonfinite_skipped": guard.total},
                        {"loader": loader.state_dict(), "rng": checkpoint.rng_state()}, tc.keep_last)

    monitor = Monitor(out, enabled=main_rank)
    evaluate = _eval_hook(cfg)
    window = Window(engine.device)
    dtype = engine_lib.compute_dtype(engine)
    patch = cfg.model.vision.patch_size
    batches = _batches(loader)
    saved_at, stopped_early = step if tag_dir is not None else -1, False
    try:
        while step < tc.steps:
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
            t_step, data_s, applied = time.perf_counter(), 0.0, 0
            while applied < tc.grad_accum:  # one optimizer step = grad_accum finite micro-batches
                t = time.perf_counter()
                batch = next(batches)
                data_s += time.perf_counter() - t
                window.add_batch(batch["pixels"].shape[0], batch_tokens(batch, patch))
                result = engine_lib.train_micro_step(engine, engine_lib.to_device(batch, engine.device, dtype))
                if result.applied:
                    guard.passed()
                    applied += 1
                    window.add_losses(result.losses)
                    continue
                stop_run = guard.dropped()
                monitor.print(f"step {step + 1}: non-finite loss, batch skipped "
                              f"({guard.in_a_row} in a row, {guard.total} in total)")
                if stop_run:
                    raise engine_lib.NonFiniteLoss(
                        f"{guard.in_a_row} non-finite losses in a row at step {step + 1} (train.max_nonfinite="
                        f"{tc.max_nonfinite}); stopping. Last good checkpoint: {checkpoint.find_latest(out)}")
            step += 1
            window.add_step(data_s, time.perf_counter() - t_step - data_s)

            if step % tc.log_every == 0 or step == tc.steps:
                metrics = window.reduce()
                metrics.update(_engine_metrics(engine, cfg, lrs, guard.total))
                metrics.update({f"data/skipped/{k}": v for k, v in gather_counters(loader.counters()).items()})
                monitor.scalars(step, metrics)
                monitor.print(console_line(step, tc.steps, metrics))
            stop = engine_lib.any_rank(_checkpoint_requested.is_set())
            if step % tc.save_every == 0 or step == tc.steps or stop:
                save()
                saved_at = step
            if evaluate is not None and step % tc.eval_every == 0:
                results = evaluate(engine.module, cfg, step) or {}
                monitor.scalars(step, {f"eval/{k}": v for k, v in results.items()})
            if stop:
                stopped_early = True
                monitor.print(f"checkpoint requested: saved at step {step}, stopping")
                break
    finally:
        monitor.close()
    _checkpoint_requested.clear()
    return {"step": step, "nonfinite_skipped": guard.total, "stopped_early": stopped_early,
            "checkpoint": str(checkpoint.checkpoint_root(out) / checkpoint.tag_for(saved_at)) if saved_at >= 0
            else None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config name (tiny, base) or YAML path")
    p.add_argument("--resume", help="auto | none | a step_* checkpoint directory (overrides train.resume)")
    # The deepspeed launcher appends --local_rank; the value is read from LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=1000")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    logging.basicConfig(level=logging.INFO if distributed.detect().rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    summary = train(load_config(args.config, overrides))
    if distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
