"""Checkpoints: DeepSpeed save on every rank, an atomic `latest`, keep-last-K, resume, fp32 export.

Layout under `<output_dir>/checkpoints/`:

    step_00001000/            one DeepSpeed tag (model + ZeRO optimizer shards, client state)
        rank_00000.pt ...     per-rank state: loader position, RNG states
        complete.json         written last, by rank 0, once every rank has finished writing
    latest                    the newest complete tag, replaced atomically (write + rename)

A crash mid-save leaves a tag without `complete.json` and `latest` still naming the previous one;
resume ignores such tags and the next save removes them.

    python -m pipeline.checkpoint <output_dir> --out model_fp32.pt     # consolidate for eval/fine-tuning
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed

log = logging.getLogger("pipeline.checkpoint")

LATEST = "latest"
COMPLETE = "complete.json"


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(tag_dir: Path) -> int:
    return int(tag_dir.name.split("_")[-1])


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(obj, indent=1))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------- RNG
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save
def save(engine, output_dir, step: int, client_state: dict, rank_state: dict, keep_last: int,
         protect: tuple[str, ...] = ()) -> Path:
    """Save on every rank (collective). Returns the tag directory. Tags in `protect` (the best
    checkpoint) survive pruning."""
    root, tag = checkpoint_root(output_dir), tag_for(step)
    tag_dir = root / tag
    rank = distributed.rank()
    if rank == 0 and tag_dir.exists():  # left over from a save that crashed before completing
        shutil.rmtree(tag_dir)
    distributed.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=dict(client_state, step=step), save_latest=False)
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, tag_dir / f"rank_{rank:05d}.pt")
    distributed.barrier()  # every rank's files are written before the checkpoint is declared complete
    if rank == 0:
        _atomic_write(tag_dir / COMPLETE, json.dumps({"step": step, "world_size": distributed.world_size(),
                                                      "time": time.time()}))
        _atomic_write(root / LATEST, tag)
        prune(root, keep_last, protect)
    distributed.barrier()
    return tag_dir


def prune(root: Path, keep_last: int, protect: tuple[str, ...] = ()) -> None:
    """Keep the newest `keep_last` complete tags (all if <= 0) and those named in `protect`; drop
    incomplete ones."""
    tags = sorted((d for d in root.glob("step_*") if d.is_dir()), key=_step_of)
    complete = [d for d in tags if is_complete(d)]
    keep = set(complete[-keep_last:] if keep_last > 0 else complete) | {d for d in complete if d.name in protect}
    for d in tags:
        if d not in keep:
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- resume
def find_latest(output_dir) -> Path | None:
    """The newest complete tag: the one `latest` names, else the highest complete step."""
    root = checkpoint_root(output_dir)
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if is_complete(named):
            return named
        log.warning("%s names %s, which is not a complete checkpoint; scanning", latest, named)
    complete = [d for d in root.glob("step_*") if d.is_dir() and is_complete(d)]
    return max(complete, key=_step_of) if complete else None


def resolve(output_dir, resume: str) -> Path | None:
    """`resume` = "auto" (newest complete in output_dir, or None), "none", or a tag directory."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(output_dir)
    tag_dir = Path(resume)
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"train.resume={resume!r}: no such checkpoint directory "
                                f"(use 'auto' for the newest checkpoint in {checkpoint_root(output_dir)})")
    if not is_complete(tag_dir):
        raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint "
                                f"(no {COMPLETE}: the save was interrupted, or it is not a step_* directory)")
    return tag_dir


@dataclass
class Resumed:
    tag_dir: Path
    step: int
    client_state: dict
    rank_state: dict | None  # None when this rank has no file (resumed with more ranks)


def load(engine, tag_dir: Path) -> Resumed:
    """Load model, optimizer, scheduler and client state of `tag_dir` into `engine` (collective)."""
    path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
    rank_file = tag_dir / f"rank_{distributed.rank():05d}.pt"
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False) if rank_file.exists() else None
    if rank_state is None:
        log.warning("%s missing: this rank restarts its loader from the step count and reseeds", rank_file)
    return Resumed(tag_dir, int(client["step"]), client, rank_state)


# ---------------------------------------------------------------- fp32 export
def consolidate(output_dir_or_tag, out_file) -> Path:
    """One fp32 state dict from a ZeRO checkpoint (DeepSpeed's zero_to_fp32), loadable without DeepSpeed.

    Accepts an output directory (its newest complete checkpoint) or a tag directory.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    src = Path(output_dir_or_tag)
    tag_dir = src if is_complete(src) else find_latest(src)
    if tag_dir is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_root(src)}")
    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.float().contiguous() for k, v in state.items()}, out)
    return out


def load_fp32(model: torch.nn.Module, path, strict: bool = True) -> torch.nn.Module:
    """Load a consolidated fp32 file into a plain (non-DeepSpeed) model."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=strict)
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Consolidate a ZeRO checkpoint into one fp32 state dict.")
    p.add_argument("checkpoint", help="output directory (newest complete checkpoint) or a step_* directory")
    p.add_argument("--out", required=True, help="output .pt file")
    args = p.parse_args(argv)
    print(consolidate(args.checkpoint, args.out))


if __name__ == "__main__":
    main()
