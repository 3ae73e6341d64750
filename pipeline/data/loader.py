"""The training loader: mixed image/video sources -> masked, tokenised batches, resumable.

Layout of one epoch (identical on every rank, see schedule.py): step s is fed by source
`schedule[s]`, and on every rank by reader slot `s % slots` (slots = DataLoader workers, >= 1).
DataLoader workers hand out batches round-robin, so worker w of an epoch started at step `start`
serves slot (w + start) % slots, and the batches arrive in step order.

Sharding:
- split: per epoch the source's shards are laid end to end in a (seed, epoch) order and every
  (rank, slot) gets one contiguous range of it, exactly as many samples as its steps need, so each
  sample is read once per epoch across ranks x workers (the remainder, < batch x world per source,
  waits for the next epoch's order). A bad sample is replaced from a further pass over the source.
- resample: every (rank, slot) draws whole shards with replacement from its own seed.

Randomness is keyed, never global: augmentation and masks of sample i of step s come from
(seed, epoch, rank, s * batch + i); shard orders and shuffles from (seed, epoch, rank, slot, source).
"""
from __future__ import annotations

import logging
import random
from collections import Counter

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import Config, validate
from pipeline.data.image import Augment
from pipeline.data.masking import make_masks
from pipeline.data.samples import BadSample, decode_sample
from pipeline.data.schedule import derive_seed, epoch_schedule
from pipeline.data.shards import (
    DataError,
    SampleStream,
    Skips,
    Source,
    count_distinct,
    ranges_to_segments,
    resolve_source,
)
from pipeline.data.tokenizer import check_tokenizer, encode, load_tokenizer

log = logging.getLogger("pipeline.data")


class _SourcesEpoch(IterableDataset):
    """The batches of one epoch from `start` on, for one rank; split among DataLoader workers by slot."""

    def __init__(self, loader: "TrainLoader", epoch: int, start: int, cursors: dict):
        self.cfg, self.rank, self.tokenizer = loader.cfg, loader.rank, loader.tokenizer
        self.sources, self.slots, self.blocks = loader.sources, loader.slots, loader.blocks
        self.steps, self.source_steps = loader.steps_per_epoch, loader.source_steps
        self.epoch, self.start, self.cursors = epoch, start, cursors
        self.schedule = loader.schedule(epoch)
        self.augment = Augment.of(self.cfg.data)
        # Steps per (source, slot): over the epoch, and before `start` (what a resume skips).
        self.slot_steps = Counter((src, s % self.slots) for s, src in enumerate(self.schedule))
        self.slot_steps_done = Counter((src, s % self.slots) for s, src in enumerate(self.schedule[:start]))

    def __iter__(self):
        info = get_worker_info()
        slot = ((info.id if info else 0) + self.start) % self.slots
        skips = Skips(f"rank {self.rank} slot {slot}")
        streams = {}
        for step in range(self.start, self.steps):
            if step % self.slots != slot:
                continue
            src = self.schedule[step]
            if src not in streams:
                stream = self._stream(src, slot, skips)
                streams[src] = (stream, iter(stream))
            yield self._batch(step, src, slot, *streams[src], skips)

    # ---- where a slot's samples come from ----
    def _stream(self, src: int, slot: int, skips: Skips) -> SampleStream:
        d, source = self.cfg.data, self.sources[src]
        seed_parts = (d.seed, self.epoch, self.rank, slot, src)
        n = len(source.urls)
        if d.sharding == "split":
            order = list(range(n))
            random.Random(derive_seed("shards", d.seed, self.epoch, src)).shuffle(order)
            lengths = [d.batch_size * self.slot_steps[src, s] for s in range(self.slots)]
            offset = self.rank * d.batch_size * self.source_steps[src] + sum(lengths[:slot])

            def passes(p):
                if p == 0:  # this reader's usable samples, at their stored positions
                    segments = ranges_to_segments(order, [source.counts[i] for i in order], offset, lengths[slot])
                    return iter([(source.urls[i], *source.stored_span(i, first, k)) for i, first, k in segments])
                refill = list(range(n))  # replacements for bad samples: the whole source, reshuffled
                random.Random(derive_seed(*seed_parts, "refill", p)).shuffle(refill)
                return ((source.urls[i], 0, source.stored(i)) for i in refill)
        else:
            def passes(p):
                rng = random.Random(derive_seed(*seed_parts, "resample", p))
                while True:
                    i = rng.randrange(n)
                    yield source.urls[i], 0, source.stored(i)

        cursor = self.cursors.get(slot, {}).get(src)
        if cursor is None:  # no saved position: assume every sample so far was good
            used = d.batch_size * self.slot_steps_done[src, slot]
            cursor = (0, used // self.blocks[src], used % self.blocks[src])
        return SampleStream(source, passes, self.blocks[src], seed_parts, skips, cursor)

    # ---- one batch ----
    def _batch(self, step: int, src: int, slot: int, stream: SampleStream, samples, skips: Skips) -> dict:
        cfg, d, tok = self.cfg, self.cfg.data, self.tokenizer
        source = self.sources[src]
        video = source.modality == "video"
        size, frames = (d.video_size, d.num_frames) if video else (d.image_size, 1)
        pixels, captions, keys, cursor = [], [], [], None
        for i in range(d.batch_size):
            rng = random.Random(derive_seed("augment", d.seed, self.epoch, self.rank, step * d.batch_size + i))
            while True:
                raw, cursor = next(samples)
                try:
                    px, caps = decode_sample(raw, source.modality, size, frames, rng, self.augment, d.max_image_pixels)
                    break
                except BadSample as bad:
                    skips.add(bad.reason, f"{raw.label()}: {bad}", item=raw.item)
            stream.mark_good()
            pixels.append(px)
            captions.append(caps[rng.randrange(len(caps))])
            keys.append(raw.key)
        text = encode(tok, captions, cfg.model.text.max_len, word_ids=True)
        batch = {"pixels": torch.stack(pixels), "text_ids": text["text_ids"], "attention_mask": text["attention_mask"]}
        batch.update(self._masks(batch, text["word_ids"], step, (size // cfg.model.vision.patch_size) ** 2))
        # itm_seed keys the step's ITM negatives like the masks: a resumed run draws the same ones.
        batch.update(modality=source.modality, source=source.name, keys=keys, step=step,
                     itm_seed=derive_seed("itm", d.seed, self.epoch, self.rank, step),
                     skipped=skips.drain(), skipped_items=skips.drain_items(),
                     position={"slot": slot, "source": source.name, "cursor": list(cursor)})
        return batch

    def _masks(self, batch: dict, word_ids, step: int, num_patches: int) -> dict:
        """MLM / SCL / patch masks drawn per sample, each from its own keyed generator."""
        d, tok = self.cfg.data, self.tokenizer
        rows = []
        for i in range(d.batch_size):
            g = torch.Generator().manual_seed(derive_seed("mask", d.seed, self.epoch, self.rank,
                                                          step * d.batch_size + i))
            one = {k: batch[k][i:i + 1] for k in ("text_ids", "attention_mask")}
            rows.append(make_masks(one, self.cfg.loss, tok.all_special_ids, tok.mask_token_id, len(tok),
                                   num_patches, g, word_ids[i:i + 1]))
        return {k: torch.cat([r[k] for r in rows]) for k in ("mlm_ids", "mlm_labels", "scl_ids", "patch_keep")}


class TrainLoader:
    """Iterating yields the rest of the current epoch's batches, then moves to the next epoch:
    `while True: for batch in loader: ...`. Every rank gets `steps_per_epoch` batches per epoch.

    state_dict()/load_state_dict() carry (epoch, step_in_epoch) and each reader slot's exact stream
    position for this rank; restored on another rank or another layout, the position falls back to
    what the schedule implies (exact unless samples were skipped before the checkpoint).
    """

    def __init__(self, cfg: Config, rank: int, world_size: int, tokenizer, sources: list[Source]):
        self.cfg, self.rank, self.world_size, self.tokenizer = cfg, rank, world_size, tokenizer
        self.sources = sources
        d = cfg.data
        self.slots = max(1, d.workers)
        self.blocks = [s.shuffle_buffer or d.shuffle_buffer for s in d.sources]  # shuffle block per source
        per_step = d.batch_size * world_size
        if d.sharding == "split":
            self.source_steps = [s.total // per_step for s in sources]
            for s, n in zip(sources, self.source_steps):
                if n == 0:
                    raise DataError(f"source {s.name}: {s.total} samples, fewer than batch_size x world_size "
                                    f"= {per_step}: split sharding cannot give every rank a batch")
            self.steps_per_epoch = sum(self.source_steps)
        else:
            self.source_steps = []
            self.steps_per_epoch = (d.epoch_samples or sum(s.total for s in sources)) // per_step
        if self.steps_per_epoch < 1:
            raise DataError(f"an epoch of {d.epoch_samples or sum(s.total for s in sources)} samples "
                            f"holds no batch of batch_size x world_size = {per_step}")
        self.epoch, self.step = 0, 0
        self._cursors: dict[int, dict[int, list]] = {}
        self._skipped: Counter = Counter()

    def schedule(self, epoch: int) -> list[int]:
        d = self.cfg.data
        return epoch_schedule(d.mixing, d.sharding, self.steps_per_epoch, [s.weight for s in self.sources],
                              self.source_steps, d.seed, epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step, self._cursors = epoch, 0, {}

    def counters(self) -> dict:
        """Skipped samples (and shards) so far, per reason."""
        return dict(self._skipped)

    def _layout(self) -> dict:
        d = self.cfg.data
        return {"world_size": self.world_size, "slots": self.slots, "batch_size": d.batch_size,
                "blocks": self.blocks, "sharding": d.sharding, "mixing": d.mixing, "seed": d.seed,
                "sources": [[s.name, s.weight, s.total] for s in self.sources],
                "steps_per_epoch": self.steps_per_epoch}

    def state_dict(self) -> dict:
        names = [s.name for s in self.sources]
        return {"epoch": self.epoch, "step_in_epoch": self.step, "steps_per_epoch": self.steps_per_epoch,
                "rank": self.rank, "layout": self._layout(),
                "cursors": {str(slot): {names[src]: list(c) for src, c in per.items()}
                            for slot, per in self._cursors.items()},
                "skipped": dict(self._skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step_in_epoch"])
        saved_steps = int(state.get("steps_per_epoch", self.steps_per_epoch))
        if saved_steps != self.steps_per_epoch:  # another world size: keep the share of the epoch done
            self.step = round(self.step * self.steps_per_epoch / saved_steps)
        self._skipped = Counter(state.get("skipped", {}))
        self._cursors = {}
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
            return
        if state.get("rank") != self.rank or state.get("layout") != self._layout():
            log.warning("data loader state comes from another rank or data layout: resuming at epoch %d step "
                        "%d from the schedule, not from saved stream positions", self.epoch, self.step)
            return
        index = {s.name: i for i, s in enumerate(self.sources)}
        self._cursors = {int(slot): {index[name]: list(c) for name, c in per.items()}
                         for slot, per in state.get("cursors", {}).items()}

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        d = self.cfg.data
        loader = batch_loader(_SourcesEpoch(self, self.epoch, self.step, self._cursors), d.workers,
                              (d.seed, self.epoch, self.rank, self.step), d.prefetch)
        counted = set()  # (reason, item) this epoch: a bad item read by two slots counts once per rank
        for batch in loader:
            if batch["step"] != self.step:
                raise RuntimeError(f"data loader out of order: got step {batch['step']}, expected {self.step}")
            batch["skipped"] = count_distinct(batch["skipped"], batch.pop("skipped_items"), counted)
            self._skipped.update(batch["skipped"])
            pos = batch["position"]
            src = next(i for i, s in enumerate(self.sources) if s.name == pos["source"])
            self._cursors.setdefault(pos["slot"], {})[src] = list(pos["cursor"])
            self.step += 1
            yield batch
        if self._skipped:
            log.info("epoch %d done; skipped so far: %s", self.epoch, dict(self._skipped))
        self.epoch, self.step, self._cursors = self.epoch + 1, 0, {}


def batch_loader(batches: IterableDataset, workers: int, seed_parts: tuple, prefetch: int = 2) -> DataLoader:
    """A DataLoader over an iterable of whole batches (workers hand them out in turn). Its own
    generator: it would otherwise draw its base seed from the global RNG, which a checkpoint
    restores, so a resumed run would draw other ITM negatives and dropout than an uninterrupted one."""
    seed = torch.Generator().manual_seed(derive_seed("dataloader", *seed_parts))
    return DataLoader(batches, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=prefetch if workers > 0 else None, generator=seed)


def resolve_sources(cfg: Config) -> list[Source]:
    """`cfg.data.sources` with their shards expanded and counted (an error names what is missing)."""
    if not cfg.data.sources:
        raise DataError("data.sources is empty: no training data configured")
    return [resolve_source(s.name or f"source{i}", s.modality, s.weight, s.shards, s.num_samples)
            for i, s in enumerate(cfg.data.sources)]


def build_train_loader(cfg: Config, rank: int, world_size: int, tokenizer=None) -> TrainLoader:
    """The loader for `rank` of `world_size` over `cfg.data.sources` (tokenizer: cfg.data.tokenizer)."""
    validate(cfg)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.data.tokenizer)
    check_tokenizer(tokenizer, cfg.model.text)
    return TrainLoader(cfg, rank, world_size, tokenizer, resolve_sources(cfg))
