"""The training loop shared by pre-training and fine-tuning: DeepSpeed engine, resume, monitoring,
non-finite guard, checkpoints, periodic evaluation and the best checkpoint.

    summary = fit(cfg, make_model, make_loader, evaluate=..., best=("eval/vqa_score", "max"))

`make_model()` builds the (CPU) model, pretrained weights included; `make_loader(rank, world)` returns
a resumable loader (iterating yields one epoch of batch dicts; `state_dict`, `load_state_dict`,
`counters`). `evaluate(model, cfg, step)` returns scalars, logged under `eval/`. Collective: every
rank of the launch calls `fit`.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint, distributed, engine as engine_lib, runtime
from pipeline.config import Config, accumulation, batch_line, dump_config, to_dict
from pipeline.monitor import Monitor, Window, batch_tokens, console_line, gather_counters

log = logging.getLogger("pipeline.trainer")

_checkpoint_requested = threading.Event()
BEST = "best.json"


def request_checkpoint() -> None:
    """Ask a running `fit` to save a checkpoint at the next step boundary and return.

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


def read_best(output_dir) -> dict | None:
    """{"step", "tag", "metric", "value"} of a run's best checkpoint so far, or None."""
    path = checkpoint.checkpoint_root(output_dir) / BEST
    return json.loads(path.read_text()) if path.is_file() else None


class _Best:
    """The best evaluation so far (by `key`, "max" or "min"), kept across resumes in checkpoints/best.json."""

    def __init__(self, out: Path, key: str | None, mode: str):
        self.out, self.key, self.mode = out, key, mode
        self.record = read_best(out) if key else None

    def improves(self, results: dict) -> bool:
        if not self.key:
            return False
        if self.key not in results:
            raise KeyError(f"best-checkpoint metric {self.key!r} not among the evaluation's {sorted(results)}")
        if self.record is None:
            return True
        return results[self.key] > self.record["value"] if self.mode == "max" else \
            results[self.key] < self.record["value"]

    def keep(self, step: int, results: dict) -> None:
        self.record = {"step": step, "tag": checkpoint.tag_for(step), "metric": self.key,
                       "value": float(results[self.key])}
        if distributed.is_main():
            checkpoint.write_json(checkpoint.checkpoint_root(self.out) / BEST, self.record)

    @property
    def protected(self) -> tuple[str, ...]:
        return (self.record["tag"],) if self.record else ()


def fit(cfg: Config, make_model, make_loader, evaluate=None, best: tuple[str, str] | None = None,
        client_state: dict | None = None, finish=None, preflight=None) -> dict:
    """Train to `cfg.train.steps` (or until `request_checkpoint()`); returns a summary dict.

    `best` = (eval tag, "max" | "min"): the checkpoint of the best evaluation is kept (beside the
    last `train.keep_last`) and named in checkpoints/best.json. `finish(engine, summary)`, called on
    every rank once the run reached `train.steps`, may add to the summary (e.g. test metrics).
    `preflight()` checks the run's inputs after the config and before any process group exists.
    """
    tc, out = cfg.train, Path(cfg.train.output_dir)
    # Configuration errors surface before any process group or model exists.
    ds_config = engine_lib.ds_config_for(cfg, distributed.detect().world_size)
    tag_dir = checkpoint.resolve(out, tc.resume)
    saved_world = checkpoint.saved_world_size(tag_dir) if tag_dir is not None else None
    elastic = saved_world is not None and saved_world != distributed.detect().world_size
    if elastic:  # ZeRO shards of another world size load only through DeepSpeed's universal format
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    if preflight is not None:
        preflight()

    env = engine_lib.init_distributed()
    runtime.exit_with_launcher()
    with runtime.hold_output_dir(out, env.rank == 0), runtime.stop_on_signals(request_checkpoint) as received:
        weights_dir = None
        if elastic:
            if env.rank == 0:
                log.warning("%s was written by %d ranks, this run has %d: converting it to a universal checkpoint",
                            tag_dir, saved_world, env.world_size)
                checkpoint.to_universal(tag_dir)
            distributed.barrier()
            weights_dir = checkpoint.universal_dir(tag_dir)
        summary = _fit(cfg, env, tag_dir, weights_dir, ds_config, make_model, make_loader, evaluate, best,
                       client_state, finish)
        got = distributed.max_over_ranks(received[0] if received else 0)  # the signal may reach one rank only
        summary["signal"] = signal.Signals(got).name if got else None
        return summary


def _fit(cfg, env, tag_dir, weights_dir, ds_config, make_model, make_loader, evaluate, best, client_state,
         finish) -> dict:
    tc, out = cfg.train, Path(cfg.train.output_dir)
    main_rank = env.rank == 0
    seed_everything(tc.seed)  # identical initial weights on every rank
    engine = engine_lib.initialize(make_model(), cfg, ds_config)
    seed_everything(tc.seed + env.rank)  # per-rank ITM negatives and dropout
    loader = make_loader(env.rank, env.world_size)
    accum = accumulation(cfg, env.world_size)  # derived anew at every start: an elastic resume keeps the global batch
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        print(batch_line(cfg, env.world_size), flush=True)

    step, skipped = 0, 0
    if tag_dir is not None:
        base_lrs = list(engine.lr_scheduler.base_lrs)  # this config's, before the checkpoint's replace them
        state = checkpoint.load(engine, tag_dir, weights_dir)
        step, skipped = state.step, int(state.client_state.get("nonfinite_skipped", 0))
        engine_lib.follow_schedule(engine, step, base_lrs)
        if state.rank_state is not None and not weights_dir:
            loader.load_state_dict(state.rank_state["loader"])
            checkpoint.set_rng_state(state.rank_state["rng"])
        else:  # another world size: the epoch position of rank 0, mapped to this layout; fresh seeds
            loader.load_state_dict(checkpoint.rank_file_state(tag_dir, 0)["loader"])
            seed_everything(tc.seed + env.rank + 1_000_003 * step)
        if weights_dir is not None:  # the conversion has served; the new world's checkpoints replace it
            distributed.barrier()
            if main_rank:
                checkpoint.remove_universal(weights_dir)
        if main_rank:
            print(f"resumed from {tag_dir} at step {step}", flush=True)
            if step >= tc.steps:
                print(f"the checkpoint is at step {step}, train.steps={tc.steps}: nothing left to train "
                      "(raise train.steps to continue)", flush=True)

    guard = engine_lib.NonFiniteGuard(tc.max_nonfinite, total=skipped)
    keep_best = _Best(out, *(best or (None, "max")))

    def save():
        checkpoint.save(engine, out, step, {"config": to_dict(cfg), "nonfinite_skipped": guard.total,
                                            **(client_state or {})},
                        {"loader": loader.state_dict(), "rng": checkpoint.rng_state()}, tc.keep_last,
                        protect=keep_best.protected)

    monitor = Monitor(out, enabled=main_rank)
    window = Window(engine.device)
    dtype = engine_lib.compute_dtype(engine)
    patch = cfg.model.vision.patch_size
    batches = _batches(loader)
    # Contrastive accumulation takes a step's micro-batches together (pipeline/gradcache.py).
    group_size = accum if tc.contrastive_accum else 1
    saved_at, stopped_early = step if tag_dir is not None else -1, False
    try:
        while step < tc.steps:
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
            t_step, data_s, applied = time.perf_counter(), 0.0, 0
            while applied < accum:  # one optimizer step = `accum` finite micro-batches
                t = time.perf_counter()
                group = [next(batches) for _ in range(group_size)]
                data_s += time.perf_counter() - t
                for batch in group:
                    window.add_batch(batch["pixels"].shape[0], batch_tokens(batch, patch))
                group = [engine_lib.to_device(b, engine.device, dtype) for b in group]
                result = (engine_lib.train_group_step(engine, group, cfg.loss) if group_size > 1
                          else engine_lib.train_micro_step(engine, group[0]))
                if result.applied:
                    guard.passed()
                    applied += group_size
                    window.add_losses(result.losses)
                    if result.partial:
                        guard.total += result.partial
                        monitor.print(f"step {step + 1}: non-finite ITM/MLM/MVM loss in {result.partial} "
                                      f"micro-batch(es) of the cached step: their contrastive gradient alone was "
                                      f"applied ({guard.total} non-finite in total)")
                    continue
                stop_run = guard.dropped()
                monitor.print(f"step {step + 1}: non-finite loss, {'step' if group_size > 1 else 'batch'} skipped "
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
            stop = distributed.any_rank(_checkpoint_requested.is_set()) and step < tc.steps  # the last step ends anyway
            results = None
            if evaluate is not None and tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.steps):
                results = evaluate(engine.module, cfg, step) or {}
                monitor.scalars(step, {f"eval/{k}": v for k, v in results.items()})
            new_best = results is not None and keep_best.improves({f"eval/{k}": v for k, v in results.items()})
            if step % tc.save_every == 0 or step == tc.steps or stop or new_best:
                save()
                saved_at = step
            if new_best:  # named only once its checkpoint is complete
                keep_best.keep(step, {f"eval/{k}": v for k, v in results.items()})
            if stop:
                stopped_early = True
                monitor.print(f"checkpoint requested: saved at step {step}, stopping")
                break
    finally:
        monitor.close()
    _checkpoint_requested.clear()
    summary = {"step": step, "nonfinite_skipped": guard.total, "stopped_early": stopped_early,
               "global_batch": cfg.data.batch_size * env.world_size * accum, "accumulation": accum,
               "checkpoint": str(checkpoint.checkpoint_root(out) / checkpoint.tag_for(saved_at)) if saved_at >= 0
               else None, "best": keep_best.record}
    if finish is not None and not stopped_early:
        finish(engine, summary)
    return summary
