"""Checkpoints: DeepSpeed save on every rank, an atomic `latest`, keep-last-K, resume, fp32 export.

Layout under `<output_dir>/checkpoints/`:

    step_00001000/            one DeepSpeed tag (model + ZeRO optimizer shards, client state)
        rank_00000.pt ...     per-rank state: loader position, RNG states
        complete.json         written last, by rank 0, once every rank has finished writing; lists
                              every file of the tag with its size
    latest                    the newest complete tag, replaced atomically (write + rename), for
                              people and DeepSpeed's own loader; resume orders tags by complete.json's time

A crash mid-save (or a full disk) leaves a tag without `complete.json` and `latest` still naming the
previous one; resume ignores such tags and the next save removes them. A complete tag whose files no
longer match `complete.json` (deleted, truncated) is damaged: `--resume auto` falls back to the newest
intact tag, an explicit `--resume <dir>` is an error naming the file.

    python -m pipeline.train.checkpoint <output_dir> --out model.safetensors  # consolidate for eval/fine-tuning

Nothing loaded here runs code: the project's own files hold tensors and plain containers, read with
`weights_only=True`; DeepSpeed's loaders (its checkpoint engine, zero_to_fp32, ds_to_universal and the
universal loader all call `torch.load(weights_only=False)`) run inside `safe_torch_load()`, which
reads every file the same way, allowing only the few DeepSpeed classes its optimizer state holds
(`DEEPSPEED_CLASSES`). A file holding anything else is refused with an error naming it and the class.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed

log = logging.getLogger("pipeline.train.checkpoint")

LATEST = "latest"
COMPLETE = "complete.json"
# torch.save reports a failed write (ENOSPC, EDQUOT, EIO) as a RuntimeError without the errno.
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "iostream error")
_NEARLY_FULL = 64 * 2**20  # bytes free after a failed write below which the disk counts as full


class CheckpointError(FileNotFoundError):
    """A checkpoint that cannot be resumed from: missing, incomplete or damaged."""


class CheckpointWriteError(OSError):
    """A save that could not write its files (the previous checkpoint and `latest` are untouched)."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file that holds an object other than tensors, plain containers and allowed classes."""


# ---------------------------------------------------------------- loading without running code
def deepspeed_classes() -> list:
    """The classes DeepSpeed's checkpoint files hold beside tensors and plain containers (its optimizer
    state: the ZeRO stage, the loss scaler, fragment addresses): the only ones loading may build."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _numpy_arrays() -> list:
    """What a rank file of an earlier version holds for NumPy's RNG state: plain arrays (an array of
    objects would still need its objects allowed)."""
    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype] + [type(np.dtype(t)) for t in ("uint32", "float64")]


_torch_load = torch.load


def safe_load(path, map_location="cpu", allow=(), **kw):
    """torch.load that builds tensors, plain containers and the classes in `allow` only. Anything
    else (a pickled object whose loading would run code) is an UnsafeCheckpoint naming file and class."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return _torch_load(path, map_location=map_location, weights_only=True, **kw)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err)) or re.search(r"global (\S+)", str(err))
        what = found.group(1) if found else str(err).splitlines()[0]
        raise UnsafeCheckpoint(f"{path}: refused: it holds {what}, which is neither a tensor nor a plain container "
                               "(loading it could run code); only files written by this pipeline and DeepSpeed load"
                               ) from None


@contextlib.contextmanager
def safe_torch_load():
    """Within: every torch.load, DeepSpeed's included, goes through `safe_load` with DEEPSPEED_CLASSES."""
    allowed = deepspeed_classes()

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, **kw):
        return safe_load(f, map_location, allowed, **kw)

    torch.load = load
    try:
        yield
    finally:
        torch.load = _torch_load


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
    """The global RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # a rank file of an earlier version: NumPy's own tuple
        np.random.set_state(n)
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
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=dict(client_state, step=step), save_latest=False)
        tag_dir.mkdir(parents=True, exist_ok=True)
        torch.save(rank_state, tag_dir / f"rank_{rank:05d}.pt")
        distributed.barrier()  # every rank's files are written before the checkpoint is declared complete
        if rank == 0:
            # complete.json and latest come last: a failure before them leaves the previous checkpoint current.
            _atomic_write(tag_dir / COMPLETE, json.dumps({"step": step, "world_size": distributed.world_size(),
                                                          "time": time.time(), "files": file_sizes(tag_dir)}))
            _atomic_write(root / LATEST, tag)
    except (OSError, RuntimeError) as err:
        clear = write_error(err, tag_dir)
        if clear is None:
            raise
        raise clear from err
    if rank == 0:
        prune(root, keep_last, protect + (tag,))  # the tag just written survives even behind newer ones
    distributed.barrier()
    return tag_dir


def write_error(err: BaseException, tag_dir: Path) -> CheckpointWriteError | None:
    """A clear error for a save that failed writing (full disk, quota), or None for any other error."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        code, path, free = err.errno, err.filename or tag_dir, _free_bytes(tag_dir)
    elif isinstance(err, RuntimeError) and any(m in str(err) for m in _TORCH_WRITE_FAILED):
        # No errno to go by: a (nearly) full filesystem after the failure tells a full disk from the rest.
        free = _free_bytes(tag_dir)
        code, path = (errno.ENOSPC if free is not None and free < _NEARLY_FULL else None), tag_dir
    else:
        return None
    what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}.get(
        code, "write failed (a quota or I/O error?)")
    room = "unknown space" if free is None else f"{free / 2**20:.1f} MiB"
    out = CheckpointWriteError(f"{what} while writing {path} ({room} free there; "
                               f"{tag_dir.parent / LATEST} and the checkpoints before are unchanged): {err}")
    out.errno = code
    return out


def _free_bytes(path: Path) -> int | None:
    """Free bytes on `path`'s filesystem (None if that cannot be read: the error being reported wins)."""
    try:
        while not path.exists() and path != path.parent:  # disk_usage needs an existing path
            path = path.parent
        return shutil.disk_usage(path).free
    except OSError:
        return None


def file_sizes(tag_dir: Path) -> dict[str, int]:
    """{relative path: bytes} of every file of a tag (hidden temporaries and complete.json excluded).

    Sizes, not checksums: reading every shard back would double the save time, and a deleted or
    truncated file (the damage a killed copy or a full disk leaves) already shows in its size.
    """
    return {p.relative_to(tag_dir).as_posix(): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != COMPLETE and not p.name.startswith(".")}


def prune(root: Path, keep_last: int, protect: tuple[str, ...] = ()) -> None:
    """Keep the newest `keep_last` intact complete tags (all complete ones if <= 0) and those named in
    `protect`; drop incomplete and damaged ones."""
    tags = sorted((d for d in root.glob("step_*") if d.is_dir()), key=_step_of)
    complete = [d for d in tags if is_complete(d)]
    intact = [d for d in complete if not verify(d)]  # a damaged tag must not take an intact one's place
    keep = set(intact[-keep_last:] if keep_last > 0 else complete) | {d for d in complete if d.name in protect}
    for d in tags:
        if d not in keep:
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- resume
def verify(tag_dir: Path) -> list[str]:
    """Problems of a complete tag against the file list in its complete.json ([] = intact).

    Read-only (every rank may call it at once). A complete.json without a file list cannot be checked
    and counts as intact.
    """
    tag_dir = Path(tag_dir)
    try:
        files = json.loads((tag_dir / COMPLETE).read_text()).get("files")
    except FileNotFoundError:
        return [f"{tag_dir / COMPLETE} missing (the save did not complete)"]
    except (OSError, ValueError, AttributeError) as err:
        return [f"{tag_dir / COMPLETE} unreadable: {err}"]
    if files is None:
        log.debug("%s has no file list: not verified", tag_dir / COMPLETE)
        return []
    return [p for p in (_file_problem(tag_dir / name, size) for name, size in sorted(files.items())) if p]


def _file_problem(path: Path, expected: int) -> str | None:
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return f"{path} missing (expected {expected} bytes)"
    return None if actual == expected else f"{path} is {actual} bytes, expected {expected}"


def _completed_at(tag_dir: Path) -> float:
    """When rank 0 declared the tag complete (complete.json's `time`; 0 if it has none)."""
    try:
        return float(json.loads((tag_dir / COMPLETE).read_text()).get("time", 0.0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0


def _candidates(root: Path) -> list[Path]:
    """Complete tags, most preferred first: the one completed last, then by step, newest first.

    Completion time, not `latest`, decides: a run killed between a tag's complete.json and the
    rename of `latest` resumes from that tag, not the one before it; and after a resume from an
    older tag, the new branch's tags (completed later) win over the abandoned branch's higher steps.
    """
    complete = [d for d in root.glob("step_*") if d.is_dir() and is_complete(d)]
    return sorted(complete, key=lambda d: (_completed_at(d), _step_of(d)), reverse=True)


def find_latest(output_dir) -> Path | None:
    """The newest intact complete tag (the one completed last), or None.

    A damaged tag (a file deleted or truncated) is skipped with a warning naming its files, so a run
    resumes from the one before (kept by train.keep_last or as the best checkpoint).
    """
    return _first_intact(_candidates(checkpoint_root(output_dir)))


def _first_intact(candidates: list[Path]) -> Path | None:
    for d in candidates:
        problems = verify(d)
        if not problems:
            return d
        _warn("checkpoint %s is damaged, skipping it: %s", d, "; ".join(problems))
    return None


def resolve(output_dir, resume: str) -> Path | None:
    """`resume` = "auto" (newest intact complete in output_dir, or None), "none", or a tag directory.

    Read-only and deterministic: every rank calls it on the shared filesystem and must get the same tag.
    """
    if resume == "none":
        return None
    root = checkpoint_root(output_dir)
    if resume == "auto":
        candidates = _candidates(root)
        found = _first_intact(candidates)
        if found is None and candidates:  # never start over silently on top of checkpoints
            raise CheckpointError(f"every complete checkpoint in {root} is damaged (see the warnings above); "
                                  f"restore one, or start over with train.resume=none")
        if found is not None and found != candidates[0]:
            _warn("resuming from %s, the newest intact checkpoint", found)
        return found
    tag_dir = Path(resume)
    if not tag_dir.is_dir():
        raise CheckpointError(f"train.resume={resume!r}: no such checkpoint directory "
                              f"(use 'auto' for the newest checkpoint in {root})")
    if not is_complete(tag_dir):
        raise CheckpointError(f"train.resume={resume!r} is not a complete checkpoint "
                              f"(no {COMPLETE}: the save was interrupted, or it is not a step_* directory)")
    _check_intact(tag_dir, f"train.resume={resume!r}", f"train.resume=auto picks the newest intact one in {root}")
    return tag_dir


def _check_intact(tag_dir: Path, what: str, hint: str) -> None:
    problems = verify(tag_dir)
    if problems:
        raise CheckpointError(f"{what} is a damaged checkpoint: {'; '.join(problems)} ({hint})")


def _warn(msg: str, *args) -> None:
    """Warn once per launch, not once per rank (resolve runs on every rank, before the process group)."""
    first = distributed.rank() == 0 if distributed.is_initialized() else distributed.detect().rank == 0
    log.log(logging.WARNING if first else logging.DEBUG, msg, *args)


@dataclass
class Resumed:
    tag_dir: Path
    step: int
    client_state: dict
    rank_state: dict | None  # None when this rank has no file (resumed with more ranks)


def saved_world_size(tag_dir: Path) -> int | None:
    """The number of ranks that wrote a checkpoint (from its complete.json)."""
    try:
        return json.loads((tag_dir / COMPLETE).read_text()).get("world_size")
    except (OSError, ValueError):
        return None


UNIVERSAL = "universal"  # <output_dir>/checkpoints/universal/<tag>: a tag converted for another world size


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.parent / UNIVERSAL / tag_dir.name


def to_universal(tag_dir: Path) -> Path:
    """Convert a ZeRO tag to DeepSpeed's universal checkpoint (per-parameter fp32 weights and optimizer
    states, independent of the number of ranks), once; returns the converted tag directory.
    Run on one rank; the others wait at a barrier."""
    out = universal_dir(tag_dir)
    if (out / COMPLETE).is_file():
        return out
    import argparse as _argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    with safe_torch_load():  # one worker each: the conversion runs in this process, under the safe loader
        ds_to_universal(_argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                                            num_merge_workers=1, keep_temp_folder=False, strict=True,
                                            inject_missing_state=True))
    _atomic_write(out / COMPLETE, json.dumps({"from": str(tag_dir), "time": time.time()}))
    return out


def remove_universal(converted: Path) -> None:
    """Remove a conversion once loaded, and the universal folder (with DeepSpeed's `latest_universal`)
    when no other conversion is left in it."""
    shutil.rmtree(converted, ignore_errors=True)
    folder = converted.parent
    if folder.name == UNIVERSAL and not any(p.is_dir() for p in folder.glob("step_*")):
        shutil.rmtree(folder, ignore_errors=True)


def load(engine, tag_dir: Path, weights_dir: Path | None = None) -> Resumed:
    """Load model, optimizer, scheduler and client state of `tag_dir` into `engine` (collective).
    `weights_dir`: the universal conversion of `tag_dir` when the world size changed (the engine
    was built with `checkpoint.load_universal`); rank files still come from `tag_dir`."""
    src = weights_dir or tag_dir
    with safe_torch_load():
        path, client = engine.load_checkpoint(str(src.parent), tag=src.name)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
    rank_file = tag_dir / f"rank_{distributed.rank():05d}.pt"
    rank_state = read_rank_file(rank_file) if rank_file.exists() else None
    if rank_state is None:
        log.warning("%s missing: this rank takes rank 0's epoch position and reseeds", rank_file)
    return Resumed(tag_dir, int(client["step"]), client, rank_state)


def read_rank_file(path: Path) -> dict:
    """A rank's loader position and RNG states (tensors and plain values; NumPy arrays in older files)."""
    return safe_load(path, allow=_numpy_arrays())


def rank_file_state(tag_dir: Path, rank: int) -> dict:
    return read_rank_file(tag_dir / f"rank_{rank:05d}.pt")


# ---------------------------------------------------------------- fp32 export
CONFIG_KEY = "scl_config"  # safetensors metadata: the run's config (YAML), the model's geometry included


def _tag_of(output_dir_or_tag) -> Path:
    src = Path(output_dir_or_tag)
    tag_dir = src if is_complete(src) else find_latest(src)
    if tag_dir is None:
        raise CheckpointError(f"no complete checkpoint in {checkpoint_root(src)} (or every one is damaged)")
    if tag_dir == src:
        _check_intact(tag_dir, str(src), "pass the run directory for its newest intact checkpoint")
    return tag_dir


def consolidated_state(output_dir_or_tag) -> tuple[dict, Path]:
    """The fp32 weights of a run's newest intact checkpoint (or of a step_* directory), assembled from
    its ZeRO shards by DeepSpeed's zero_to_fp32 under the safe loader. Returns (state, tag directory)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = _tag_of(output_dir_or_tag)
    with safe_torch_load():
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: v.float().contiguous() for k, v in state.items()}, tag_dir


def run_config_text(tag_dir: Path) -> str | None:
    """The config.yaml of the run a tag belongs to (None when it has none)."""
    path = tag_dir.parent.parent / "config.yaml"
    return path.read_text() if path.is_file() else None


def consolidate(output_dir_or_tag, out_file) -> Path:
    """One fp32 state dict from a ZeRO checkpoint, loadable without DeepSpeed. `.safetensors`: the run's
    config goes into the file's metadata; any other name: a torch file of tensors, with the run's
    config.yaml beside it as `<out_file stem>.yaml`. Accepts an output directory (its newest complete
    checkpoint) or a tag directory."""
    state, tag_dir = consolidated_state(output_dir_or_tag)
    out, config = Path(out_file), run_config_text(tag_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out), metadata={"format": "pt", **({CONFIG_KEY: config} if config else {})})
    else:
        torch.save(state, out)
        if config is not None:  # beside the weights: evaluation checks its model section against it
            out.with_suffix(".yaml").write_text(config)
    return out


def read_weights(path) -> tuple[dict, str | None]:
    """A consolidated file's tensors and the run config stored with it (safetensors metadata; None
    for a torch file, whose config is the `.yaml` beside it). Nothing in it runs code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu"), read_weights_metadata(path)
    state = safe_load(path)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of names to tensors")
    return state, None


def run_config(ckpt: Path) -> str | None:
    """The config (YAML text) a checkpoint was trained with: a safetensors file's metadata, the
    `<file>.yaml` beside a torch file (or a config.yaml in its folder), or the run's config.yaml of a
    run or step_* directory. None when none is found."""
    ckpt = Path(ckpt)
    if ckpt.suffix == ".safetensors" and ckpt.is_file():
        return read_weights_metadata(ckpt)
    if ckpt.is_file():
        candidates = [ckpt.with_suffix(".yaml"), ckpt.parent / "config.yaml"]
    else:
        candidates = [d / "config.yaml" for d in (ckpt, ckpt.parent, ckpt.parent.parent)]
    found = next((c for c in candidates if c.is_file()), None)
    return found.read_text() if found is not None else None


def read_weights_metadata(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get(CONFIG_KEY)


def check_model_section(ckpt, cfg, allowed: tuple[str, ...] = ()) -> None:
    """Refuse a config whose model section differs from the checkpoint's run (named keys): weights
    of another geometry can load and give other numbers silently (e.g. another head count).
    `allowed`: keys that may differ (fine-tuning resamples positions to its `model.vision.image_size`)."""
    import yaml

    from pipeline.config import ConfigError, model_differences, to_dict

    text = run_config(Path(ckpt))
    saved = yaml.safe_load(text) if text else None
    if not isinstance(saved, dict) or "model" not in saved:
        log.warning("%s: no config of its run found, so the model section cannot be checked "
                    "(a .safetensors file from `python -m pipeline.train.checkpoint` carries it)", ckpt)
        return
    diffs = [d for d in model_differences(saved["model"], to_dict(cfg)["model"]) if d.split(":")[0] not in allowed]
    if diffs:
        raise ConfigError(f"{ckpt} was trained with another model section: " + "; ".join(diffs)
                          + ". Use the run's config (the default without --config) or set these keys to its values.")


def load_fp32(model: torch.nn.Module, path, strict: bool = True) -> torch.nn.Module:
    """Load a consolidated fp32 file (safetensors or torch) into a plain (non-DeepSpeed) model."""
    model.load_state_dict(read_weights(path)[0], strict=strict)
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Consolidate a ZeRO checkpoint into one fp32 file for evaluation, "
                                            "fine-tuning and sharing.")
    p.add_argument("checkpoint", help="output directory (newest complete checkpoint) or a step_* directory")
    p.add_argument("--out", required=True, help="model.safetensors (the run's config in its metadata), or a .pt file")
    args = p.parse_args(argv)
    print(consolidate(args.checkpoint, args.out))


if __name__ == "__main__":
    main()
