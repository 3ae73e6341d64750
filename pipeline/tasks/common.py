"""What every downstream task shares: media loading, the resumable training loader over annotation
records, distributed prediction over an eval split, and loading pre-trained weights.

A *record* is a dict from a task's reader (question and image path, sentence and image pair, ...).
A task turns one record into a *sample* (tensors, or raises BadSample) and a list of samples into a
batch; the loader here does the rest for every task alike.
"""
from __future__ import annotations

import logging
import math
import random
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from pipeline import distributed
from pipeline.data.image import Augment, TooManyPixels, decode_image
from pipeline.data.loader import batch_loader
from pipeline.data.samples import BadSample
from pipeline.data.schedule import derive_seed
from pipeline.data.shards import DataError, Skips
from pipeline.data.tokenizer import encode
from pipeline.data.video import decode_video
from pipeline.train import checkpoint

log = logging.getLogger("pipeline.tasks")


# ---------------------------------------------------------------- media
def load_media(path: str | Path, modality: str, cfg, rng: random.Random | None) -> torch.Tensor:
    """pixels [T, 3, H, W] of an image (T=1) or video file; BadSample when missing or undecodable."""
    path = Path(path)
    if not path.is_file():
        raise BadSample("missing_file", str(path))
    d = cfg.data
    try:
        if modality == "image":
            return decode_image(path.read_bytes(), d.image_size, rng, Augment.of(d), d.max_image_pixels)[None]
        return decode_video(path.read_bytes(), d.num_frames, d.video_size, rng, Augment.of(d))
    except TooManyPixels as err:
        raise BadSample("image_too_large", f"{path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - decoders raise many types on corrupt input
        raise BadSample(f"corrupt_{modality}", f"{path}: {type(err).__name__}: {err}") from None


# ---------------------------------------------------------------- what every task is
class BaseTask:
    """A task's config and tokenizer, the metric its best checkpoint is chosen by (`best`: an eval
    tag and "max" | "min"), and what the runner calls besides: `bind_train(records)` (the whole
    training split), `text(texts)` (the tokenised batch)."""
    name, best = "", ("", "max")

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def bind_train(self, records: list[dict]) -> None:
        """Most tasks need no more than the record at hand; retrieval draws negative captions."""

    def text(self, texts: list[str]) -> dict:
        return encode(self.tokenizer, texts, self.cfg.model.text.max_len)


# ---------------------------------------------------------------- training loader
class _RecordsEpoch(IterableDataset):
    def __init__(self, loader: "TaskLoader", epoch: int, start: int):
        self.loader, self.epoch, self.start = loader, epoch, start

    def __iter__(self):
        ld = self.loader
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        order = ld.order(self.epoch)
        mine = order[ld.rank::ld.world][:ld.steps_per_epoch * ld.batch_size]
        skips = Skips(f"rank {ld.rank} worker {worker}")
        for step in range(self.start, ld.steps_per_epoch):
            if (step - self.start) % workers != worker:  # DataLoader hands out workers' items in turn
                continue
            samples = []
            for i in range(ld.batch_size):
                pos = step * ld.batch_size + i
                rng = random.Random(derive_seed("task", ld.seed, self.epoch, ld.rank, pos))
                samples.append(self._sample(mine[pos], order, rng, skips))
            batch = ld.collate(samples)
            batch.update(step=step, skipped=skips.drain(),
                         itm_seed=derive_seed("itm", ld.seed, self.epoch, ld.rank, step))
            yield batch

    def _sample(self, index: int, order: list[int], rng, skips: Skips):
        """The record's sample; a bad one is replaced by the next records of this epoch's order."""
        ld = self.loader
        at = order.index(index)
        for k in range(min(len(order), 100)):
            record = ld.records[order[(at + k) % len(order)]]
            try:
                return ld.make_sample(record, rng)
            except BadSample as bad:
                skips.add(bad.reason, f"{record.get('id', record)}: {bad}")
        raise DataError(f"100 records in a row could not be loaded (last: {record}); check the media folder")


class TaskLoader:
    """Batches of a training split for one rank: each epoch a (seed, epoch) permutation, dealt to the
    ranks in turn, `steps_per_epoch` full batches per rank (the remainder waits for the next order).
    state_dict() holds (epoch, step): a resumed run continues at the next batch, without replay."""

    def __init__(self, records: list[dict], make_sample, collate, batch_size: int, rank: int, world: int,
                 seed: int = 0, workers: int = 0, name: str = "train"):
        self.records, self.make_sample, self.collate = records, make_sample, collate
        self.batch_size, self.rank, self.world, self.seed, self.workers = batch_size, rank, world, seed, workers
        self.steps_per_epoch = len(records) // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise DataError(f"{name} split has {len(records)} records: fewer than one batch of {batch_size} "
                            f"for each of {world} ranks")
        self.epoch, self.step = 0, 0
        self._skipped: Counter = Counter()

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(derive_seed("task-order", self.seed, epoch)).shuffle(order)
        return order

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        data = batch_loader(_RecordsEpoch(self, self.epoch, self.step), self.workers,
                            (self.seed, self.epoch, self.rank, self.step))
        for batch in data:
            if batch["step"] != self.step:
                raise RuntimeError(f"task loader out of order: got step {batch['step']}, expected {self.step}")
            self._skipped.update(batch["skipped"])
            self.step += 1
            yield batch
        self.epoch, self.step = self.epoch + 1, 0

    def counters(self) -> dict:
        return dict(self._skipped)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "skipped": dict(self._skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._skipped = Counter(state.get("skipped", {}))
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, records: list[dict], make_sample, collate, run_batch, batch_size: int, device) -> tuple:
    """`run_batch(model, batch) -> list` (one output per row) over every record, spread over ranks.

    Every rank runs the same number of equal-size batches (ZeRO-3 gathers weights collectively);
    records that cannot be loaded are counted and left out. Returns ({record index: output}, skipped).
    """
    world, rank = distributed.world_size(), distributed.rank()
    mine = list(range(rank, len(records), world))
    per_rank = math.ceil(len(records) / world)
    padded = mine + (mine[-1:] or [0]) * (per_rank - len(mine))
    dtype = next(model.parameters()).dtype
    outputs, skips = {}, Skips("eval")
    was = model.training
    model.eval()
    for start in range(0, per_rank, batch_size):
        chunk = padded[start:start + batch_size]
        samples, keep, fallback = [], [], None
        for j, i in enumerate(chunk):
            pad = start + j >= len(mine)  # a repeat that evens out the ranks' batch counts
            try:
                s = make_sample(records[i], None)
            except BadSample as bad:
                s = None
                if not pad:
                    skips.add(bad.reason, f"{records[i].get('id', i)}: {bad}")
            samples.append(s)
            keep.append(s is not None and not pad)
            fallback = fallback if fallback is not None or s is None else s
        if fallback is None:  # nothing loadable here: still run a batch to stay in step with the ranks
            fallback = _first_loadable(records, make_sample)
        batch = collate([s if s is not None else fallback for s in samples])
        batch = {k: (v.to(device, dtype=dtype if v.is_floating_point() else None) if torch.is_tensor(v) else v)
                 for k, v in batch.items()}
        for j, out in enumerate(run_batch(model, batch)):
            if keep[j]:
                outputs[chunk[j]] = out
    model.train(was)
    skipped = dict(skips.pending)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (outputs, skipped))
        outputs, skipped = {}, Counter()
        for o, s in parts:
            outputs.update(o)
            skipped.update(s)
        skipped = dict(skipped)
    return outputs, skipped


def _first_loadable(records, make_sample):
    for r in records:
        try:
            return make_sample(r, None)
        except BadSample:
            continue
    raise DataError("no record of the eval split can be loaded")


# ---------------------------------------------------------------- pre-trained weights
def load_pretrained(model: torch.nn.Module, init: str, allow_missing: tuple[str, ...], scratch_dir) -> dict:
    """Load a pre-training checkpoint into `model` (before DeepSpeed wraps it).

    `init`: a pre-training run directory (its newest complete checkpoint), a step_* directory, or a
    consolidated file (safetensors or torch). Keys the task adds (prefixes in `allow_missing`) may be
    absent; any other missing or unexpected key is an error. A positional embedding of another grid is
    resampled. Collective when a process group exists: rank 0 consolidates a ZeRO checkpoint once, into
    `scratch_dir` (the fine-tuning run's directory, which every rank sees), and removes it after; an
    error there (a refused file) stops every rank.
    """
    from timm.layers import resample_abs_pos_embed

    path = Path(init)
    if not path.exists():
        raise FileNotFoundError(f"task.init={init!r}: no such run directory, checkpoint or file")
    if path.is_file():
        state = checkpoint.read_weights(path)[0]
    else:
        scratch = Path(scratch_dir) / ".init_fp32.safetensors"
        failed = None
        if distributed.is_main():
            try:
                checkpoint.consolidate(path, scratch)
            except Exception as err:  # noqa: BLE001 - raised below on this rank, reported on the others
                failed = err
        if distributed.any_rank(failed is not None):
            raise failed or checkpoint.CheckpointError(f"task.init={init}: rank 0 could not read it (see its log)")
        state = checkpoint.read_weights(scratch)[0]
        distributed.barrier()
        if distributed.is_main():
            scratch.unlink(missing_ok=True)
    own = model.state_dict()
    key = "vision.pos_embed"
    if key in state and key in own and state[key].shape != own[key].shape:
        grid = model.vision.patch_embed.grid_size
        old = int(math.isqrt(state[key].shape[1] - 1))
        state[key] = resample_abs_pos_embed(state[key], new_size=list(grid), old_size=[old, old], num_prefix_tokens=1)
    if hasattr(model, "adapt_pretrained"):  # a task's own change to a pre-trained tensor (NLVR2's token types)
        state = model.adapt_pretrained(state)
    drop = [k for k in state if k not in own and k.split(".")[0] in ("mlm_head", "mvm_decoder", "itm_head",
                                                                      "text_proj", "vision_proj", "itc_temp")]
    for k in drop:  # pre-training heads the task does not keep
        state.pop(k)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.startswith(allow_missing)]
    if bad_missing or unexpected:
        raise ValueError(f"task.init={init}: the checkpoint does not fit this model (missing {bad_missing[:8]}, "
                         f"unexpected {unexpected[:8]}); does the model section match the pre-training run's?")
    return {"loaded": len(state), "new": [k for k in missing]}
