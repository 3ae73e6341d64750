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
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed
from pipeline.config import Config, accumulation, batch_line, dump_config, to_dict
from pipeline.train import checkpoint, lock, process
from pipeline.train import engine as engine_lib
from pipeline.train.monitor import (
    Monitor,
    Window,
    batch_tokens,
    console_line,
    gather_counters,
)

log = logging.getLogger("pipeline.train.trainer")

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
    """Train to `cfg.train.steps` (or until `request_checkpoint()` or a stop signal); returns a summary.

    `best` = (eval tag, "max" | "min"): the checkpoint of the best evaluation is kept (beside the
    last `train.keep_last`) and named in checkpoints/best.json. `finish(engine, summary)`, called on
    every rank once the run reached `train.steps`, may add to the summary (e.g. test metrics).
    `preflight()` checks the run's inputs after the config and before any process group exists.
    """
    world = distributed.detect().world_size
    ds_config = engine_lib.ds_config_for(cfg, world)  # configuration errors before any process group exists
    tag_dir = checkpoint.resolve(Path(cfg.train.output_dir), cfg.train.resume)
    elastic = tag_dir is not None and checkpoint.saved_world_size(tag_dir) not in (None, world)
    if elastic:  # ZeRO shards of another world size load only through DeepSpeed's universal format
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    if preflight is not None:
        preflight()
    env = engine_lib.init_distributed()
    process.exit_with_launcher()
    with lock.hold_output_dir(cfg.train.output_dir, env.rank == 0), \
            process.stop_on_signals(request_checkpoint) as received:
        run = Run(cfg, env, make_model, make_loader, ds_config, evaluate, best, client_state)
        run.resume(tag_dir, elastic)
        summary = run.train()
        if finish is not None and not summary["stopped_early"]:
            finish(run.engine, summary)
        got = distributed.max_over_ranks(received[0] if received else 0)  # the signal may reach one rank only
        summary["signal"] = signal.Signals(got).name if got else None
        return summary


class NonFiniteGuard:
    """Counts the micro-batches dropped for a non-finite loss. The ranks agree on every drop (see
    `engine.train_micro_step`), so their counts, and the decision to stop, are the same everywhere."""

    def __init__(self, limit: int, out: Path, total: int = 0):
        self.limit, self.out, self.total, self.in_a_row = limit, out, total, 0

    def passed(self, partial: int = 0) -> str | None:
        """A step's micro-batches were applied; `partial` of them (contrastive accumulation) with their
        contrastive gradient alone. Returns a line to print when some were partial."""
        self.in_a_row = 0
        self.total += partial
        if partial:
            return (f"non-finite ITM/MLM/MVM loss in {partial} micro-batch(es) of the cached step: their "
                    f"contrastive gradient alone was applied ({self.total} non-finite in total)")
        return None

    def dropped(self, what: str) -> str:
        """Count one drop; returns the line to print."""
        self.in_a_row += 1
        self.total += 1
        return f"non-finite loss, {what} skipped ({self.in_a_row} in a row, {self.total} in total)"

    def check(self, step: int) -> None:
        """NonFiniteLoss once `limit` drops came in a row."""
        if self.in_a_row >= self.limit:
            raise NonFiniteLoss(f"{self.in_a_row} non-finite losses in a row at step {step} (train.max_nonfinite="
                                f"{self.limit}); stopping. Last good checkpoint: {checkpoint.find_latest(self.out)}")


class NonFiniteLoss(RuntimeError):
    pass


class Run:
    """One rank's run: its engine, loader and bookkeeping, and the pieces of the loop (`train`)."""

    def __init__(self, cfg: Config, env, make_model, make_loader, ds_config: dict, evaluate, best, client_state):
        tc = cfg.train
        self.cfg, self.env, self.out, self.main = cfg, env, Path(tc.output_dir), env.rank == 0
        seed_everything(tc.seed)  # identical initial weights on every rank
        self.engine = engine_lib.initialize(make_model(), cfg, ds_config)
        seed_everything(tc.seed + env.rank)  # per-rank ITM negatives and dropout
        self.loader = make_loader(env.rank, env.world_size)
        self.batches = _batches(self.loader)
        self.accum = accumulation(cfg, env.world_size)  # anew at every start: an elastic resume keeps the global batch
        self.group = self.accum if tc.contrastive_accum else 1  # contrastive accumulation: a step's micro-batches at once
        self.step, self.saved_at = 0, -1
        self.guard = NonFiniteGuard(tc.max_nonfinite, self.out)
        self.best = _Best(self.out, *(best or (None, "max")))
        self.evaluate, self.client_state = evaluate, client_state or {}
        self.monitor = self.window = None
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
            print(batch_line(cfg, env.world_size), flush=True)

    # ---- resume
    def resume(self, tag_dir: Path | None, elastic: bool) -> None:
        """Continue from `tag_dir` (None: start afresh): weights, optimizer, this config's LR schedule,
        the loader's position and the RNG states. A checkpoint of another world size is converted to
        DeepSpeed's universal format by rank 0 and removed once loaded; the loader keeps the share of
        the epoch done (rank 0's position) and the RNG streams are reseeded."""
        if tag_dir is None:
            return
        tc, main = self.cfg.train, self.main
        converted = self._to_universal(tag_dir) if elastic else None
        base_lrs = list(self.engine.lr_scheduler.base_lrs)  # this config's, before the checkpoint's replace them
        state = checkpoint.load(self.engine, tag_dir, converted)
        self.step = self.saved_at = state.step
        self.guard.total = int(state.client_state.get("nonfinite_skipped", 0))
        engine_lib.follow_schedule(self.engine, self.step, base_lrs)
        if state.rank_state is not None and converted is None:
            self.loader.load_state_dict(state.rank_state["loader"])
            checkpoint.set_rng_state(state.rank_state["rng"])
        else:
            self.loader.load_state_dict(checkpoint.rank_file_state(tag_dir, 0)["loader"])
            seed_everything(tc.seed + self.env.rank + 1_000_003 * self.step)
        if converted is not None:  # it has served; the new world's checkpoints replace it
            distributed.barrier()
            if main:
                checkpoint.remove_universal(converted)
        if main:
            print(f"resumed from {tag_dir} at step {self.step}", flush=True)
            if self.step >= tc.steps:
                print(f"the checkpoint is at step {self.step}, train.steps={tc.steps}: nothing left to train "
                      "(raise train.steps to continue)", flush=True)

    def _to_universal(self, tag_dir: Path) -> Path:
        if self.main:
            log.warning("%s was written by %d ranks, this run has %d: converting it to a universal checkpoint",
                        tag_dir, checkpoint.saved_world_size(tag_dir), self.env.world_size)
            checkpoint.to_universal(tag_dir)
        distributed.barrier()
        return checkpoint.universal_dir(tag_dir)

    # ---- the loop
    def train(self) -> dict:
        """Optimizer steps up to train.steps, each logged, evaluated and saved when due; a stop
        request ends the loop after the step's checkpoint."""
        self.monitor, self.window = Monitor(self.out, enabled=self.main), Window(self.engine.device)
        stopped = False
        try:
            while self.step < self.cfg.train.steps and not stopped:
                lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.engine.optimizer.param_groups)}
                self.train_step()
                self.log(lrs)
                stopped = self.evaluate_and_save()
        finally:
            self.monitor.close()
        _checkpoint_requested.clear()
        return self.summary(stopped)

    def train_step(self) -> None:
        """One optimizer step: `accum` micro-batches whose losses are finite on every rank (a dropped
        one is replaced by the next), one at a time or, with contrastive accumulation, all at once."""
        started, data_s, applied = time.perf_counter(), 0.0, 0
        while applied < self.accum:
            t = time.perf_counter()
            group = [next(self.batches) for _ in range(self.group)]
            data_s += time.perf_counter() - t
            result = self._apply(group)
            if result.applied:
                applied += self.group
                self.window.add_losses(result.losses)
                line = self.guard.passed(result.partial)
            else:
                line = self.guard.dropped("step" if self.group > 1 else "batch")
            if line:
                self.monitor.print(f"step {self.step + 1}: {line}")
            self.guard.check(self.step + 1)
        self.step += 1
        self.window.add_step(data_s, time.perf_counter() - started - data_s)

    def _apply(self, group: list[dict]):
        patch, dtype = self.cfg.model.vision.patch_size, engine_lib.compute_dtype(self.engine)
        for batch in group:
            self.window.add_batch(batch["pixels"].shape[0], batch_tokens(batch, patch))
        group = [engine_lib.to_device(b, self.engine.device, dtype) for b in group]
        if self.group > 1:
            return engine_lib.train_group_step(self.engine, group, self.cfg.loss)
        return engine_lib.train_micro_step(self.engine, group[0])

    def log(self, lrs: dict) -> None:
        tc = self.cfg.train
        if self.step % tc.log_every and self.step != tc.steps:
            return
        metrics = self.window.reduce()
        metrics.update(_engine_metrics(self.engine, self.cfg, lrs, self.guard.total))
        metrics.update({f"data/skipped/{k}": v for k, v in gather_counters(self.loader.counters()).items()})
        self.monitor.scalars(self.step, metrics)
        self.monitor.print(console_line(self.step, tc.steps, metrics))

    def evaluate_and_save(self) -> bool:
        """Evaluate and save when due (and save the best evaluation, and on a stop request: every rank
        agrees on it). Returns whether to stop."""
        tc, step = self.cfg.train, self.step
        stop = distributed.any_rank(_checkpoint_requested.is_set()) and step < tc.steps  # the last step ends anyway
        results = self._evaluate()
        new_best = results is not None and self.best.improves(results)
        if step % tc.save_every == 0 or step == tc.steps or stop or new_best:
            self.save()
        if new_best:  # named only once its checkpoint is complete
            self.best.keep(step, results)
        if stop:
            self.monitor.print(f"checkpoint requested: saved at step {step}, stopping")
        return stop

    def _evaluate(self) -> dict | None:
        tc, step = self.cfg.train, self.step
        if self.evaluate is None or tc.eval_every <= 0 or (step % tc.eval_every and step != tc.steps):
            return None
        results = {f"eval/{k}": v for k, v in (self.evaluate(self.engine.module, self.cfg, step) or {}).items()}
        self.monitor.scalars(step, results)
        return results

    def save(self) -> None:
        client = {"config": to_dict(self.cfg), "nonfinite_skipped": self.guard.total, **self.client_state}
        rank_state = {"loader": self.loader.state_dict(), "rng": checkpoint.rng_state()}
        checkpoint.save(self.engine, self.out, self.step, client, rank_state, self.cfg.train.keep_last,
                        protect=self.best.protected)
        self.saved_at = self.step

    def summary(self, stopped: bool) -> dict:
        tag = checkpoint.checkpoint_root(self.out) / checkpoint.tag_for(self.saved_at)
        return {"step": self.step, "nonfinite_skipped": self.guard.total, "stopped_early": stopped,
                "global_batch": self.cfg.data.batch_size * self.env.world_size * self.accum,
                "accumulation": self.accum, "checkpoint": str(tag) if self.saved_at >= 0 else None,
                "best": self.best.record}
