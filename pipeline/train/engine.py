"""DeepSpeed engine for pre-training: config fill-in, parameter groups, LR schedule, one train step.

The DeepSpeed JSON in `ds_configs/` holds what only DeepSpeed knows (ZeRO buckets, loss-scale
window, offload); every value the training config also decides (batch sizes, accumulation,
clipping, precision, stage, optimizer hyper-parameters) is written there as "auto" and filled in
from `TrainConfig` here. An explicit value that disagrees with the training config is an error.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from pipeline import distributed
from pipeline.config import Config, ConfigError, accumulation
from pipeline.train import gradcache
from pipeline.train.gradcache import StepResult

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"

# Parameters that are embeddings (no weight decay) though they are not nn.Embedding weights.
_EMBEDDING_NAMES = ("pos_embed", "cls_token", "temporal_embed", "mask_token")
# Top-level modules trained at the backbone rate (the towers and, as in the reference, the ITC
# projections); everything else (fusion, poolers, ITM/MLM/MVM heads) gets head_lr_mult.
_BACKBONE = ("vision", "text", "itc_temp", "text_proj", "vision_proj")


# ---------------------------------------------------------------- DeepSpeed config
def default_ds_config(cfg: Config) -> Path:
    t = cfg.train
    precision = "fp16" if t.precision == "fp16" else "bf16"  # fp32 fills bf16.enabled=false
    offload = "_offload" if t.offload_optimizer else ""
    return DS_CONFIG_DIR / f"zero{t.zero_stage}{offload}_{precision}.json"


def ds_config_for(cfg: Config, world_size: int) -> dict:
    """The filled DeepSpeed config of this run (checked before anything starts)."""
    return fill_ds_config(load_ds_config(cfg), cfg, world_size)


def load_ds_config(cfg: Config) -> dict:
    """`train.ds_config` (a path, or a file name in ds_configs/) or the default for stage/precision."""
    path = default_ds_config(cfg)
    if cfg.train.ds_config:
        given = Path(cfg.train.ds_config)
        path = next((p for p in (given, DS_CONFIG_DIR.parent / given, DS_CONFIG_DIR / given) if p.is_file()), given)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} not found (train.ds_config={cfg.train.ds_config!r}, "
                          f"train.zero_stage={cfg.train.zero_stage}, train.offload_optimizer="
                          f"{cfg.train.offload_optimizer}); files in {DS_CONFIG_DIR}: "
                          f"{', '.join(sorted(p.name for p in DS_CONFIG_DIR.glob('*.json')))}")
    return json.loads(path.read_text())


def _fill(tree: dict, dotted: str, value, source: str) -> None:
    """Set `dotted` to `value` where it is absent or "auto"; an explicit different value is an error."""
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    have = node.get(leaf, "auto")
    if have == "auto":
        node[leaf] = value
    elif (list(have) if isinstance(have, (list, tuple)) else have) != (
            list(value) if isinstance(value, (list, tuple)) else value):
        raise ConfigError(f"DeepSpeed config sets {dotted}={have!r} but the training config gives "
                          f"{value!r} ({source}); set it to \"auto\" or change {source}")


def fill_ds_config(template: dict, cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config for this run: `template` with every "auto" taken from `cfg`."""
    t, ds = cfg.train, copy.deepcopy(template)
    if "scheduler" in ds:
        raise ConfigError("DeepSpeed config has a 'scheduler' section: the LR schedule comes from "
                          "train.warmup_steps / train.decay / train.min_lr_ratio; remove it")
    opt_type = ds.get("optimizer", {}).get("type", "AdamW")
    if opt_type != "AdamW":
        raise ConfigError(f"DeepSpeed config optimizer.type={opt_type!r}: the trainer uses AdamW")
    micro, accum = cfg.data.batch_size, accumulation(cfg, world_size)
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "data.batch_size")
    _fill(ds, "gradient_accumulation_steps", accum, "train.global_batch / train.grad_accum")
    _fill(ds, "train_batch_size", micro * accum * world_size,
          f"data.batch_size x accumulation steps x world size = {micro} x {accum} x {world_size}")
    _fill(ds, "gradient_clipping", t.grad_clip, "train.grad_clip")
    _fill(ds, "zero_optimization.stage", t.zero_stage, "train.zero_stage")
    _fill(ds, "bf16.enabled", t.precision == "bf16", f"train.precision={t.precision}")
    if t.precision == "fp16" or "fp16" in ds:
        _fill(ds, "fp16.enabled", t.precision == "fp16", f"train.precision={t.precision}")
    if t.precision == "fp32" and (ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")):
        raise ConfigError("train.precision=fp32 but the DeepSpeed config enables bf16/fp16")
    offload = ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
    if t.offload_optimizer and offload == "none":
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    elif not t.offload_optimizer and offload != "none":
        raise ConfigError(f"DeepSpeed config sets zero_optimization.offload_optimizer.device={offload!r} "
                          "but train.offload_optimizer=false")
    ds.setdefault("optimizer", {"type": "AdamW"})
    _fill(ds, "optimizer.params.lr", t.lr, "train.lr")
    _fill(ds, "optimizer.params.betas", list(t.betas), "train.betas")
    _fill(ds, "optimizer.params.weight_decay", t.weight_decay, "train.weight_decay")
    # FusedAdam needs CUDA; on the CPU accelerator use torch's AdamW (offload uses DeepSpeed's CPU Adam).
    ds["optimizer"]["params"].setdefault("torch_adam", not torch.cuda.is_available())
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs itself
    return ds


# ---------------------------------------------------------------- optimizer groups and LR
def no_weight_decay(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """Biases, norm weights, scalars (temperatures) and every kind of embedding table."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or isinstance(module, nn.Embedding) or leaf in _EMBEDDING_NAMES


def param_groups(model: nn.Module, tc) -> list[dict]:
    """AdamW groups: {backbone, head, task} x {decay, no_decay}; fusion and heads at `tc.head_lr_mult`
    x `tc.lr`, a fine-tuning task's own head (`model.task_params`) at `tc.task_head_lr_mult`.

    Each group carries a `name` (for logging) and its own `lr`; LambdaLR scales every group's
    starting lr by the same schedule factor, so the multiplier holds throughout.
    """
    owner = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            owner[f"{mod_name}.{p_name}" if mod_name else p_name] = mod
    groups: dict[str, dict] = {}
    task_heads = tuple(getattr(model, "task_params", ()))
    mult = {"backbone": 1.0, "head": tc.head_lr_mult, "task": tc.task_head_lr_mult or tc.head_lr_mult}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        top = name.split(".", 1)[0]
        part = "backbone" if top in _BACKBONE else "task" if top in task_heads else "head"
        decay = not no_weight_decay(name, p, owner[name])
        key = f"{part}_{'decay' if decay else 'no_decay'}"
        g = groups.setdefault(key, {"name": key, "params": [], "weight_decay": tc.weight_decay if decay else 0.0,
                                    "lr": tc.lr * mult[part]})
        g["params"].append(p)
    return list(groups.values())


def lr_factor(step: int, tc) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warmup, then linear or cosine
    decay to `tc.min_lr_ratio` at `tc.steps`."""
    if tc.warmup_steps > 0 and step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    shape = 1.0 - progress if tc.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * shape


# ---------------------------------------------------------------- engine
def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed() -> distributed.DistEnv:
    """Rank/world from the launcher (distributed.detect), exported for DeepSpeed, process group up."""
    import deepspeed

    env = distributed.detect()
    distributed.export_env(env)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend=backend())
    return env


def initialize(model: nn.Module, cfg: Config, ds_config: dict | None = None):
    """Wrap `model` in a DeepSpeed engine with the groups, schedule and precision of `cfg`
    (`ds_config`: from `ds_config_for`, by default built here).

    The model is built (and its pretrained towers loaded) *before* this call, outside
    `deepspeed.zero.Init`: under ZeRO-3 the engine then partitions the already-loaded weights,
    so pretrained tensors are what lands in the shards (loading into `zero.Init`-partitioned
    parameters would copy into empty placeholders).
    """
    import deepspeed

    t = cfg.train
    if t.activation_checkpointing:
        model.set_grad_checkpointing()
    ds_config = ds_config or ds_config_for(cfg, distributed.world_size())
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t))  # noqa: E731
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, t),
                                      config=ds_config, lr_scheduler=schedule)
    if t.compile:
        engine.compile()
    return engine


def follow_schedule(engine, step: int, base_lrs: list[float]) -> None:
    """Set the lr of every group to this config's schedule after `step` optimizer steps.

    A loaded checkpoint brings the scheduler state and the group lrs of the run that saved it; a
    resumed run with another `train.steps`, `train.lr` or warmup must follow the new schedule from
    its first step. `base_lrs`: the scheduler's base lrs before the checkpoint was loaded.
    """
    sched = engine.lr_scheduler
    sched.base_lrs, sched.last_epoch = list(base_lrs), step
    for g, base, lam in zip(sched.optimizer.param_groups, base_lrs, sched.lr_lambdas):
        g["lr"] = base * lam(step)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def compute_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """Tensors to `device`, floating ones in the engine's compute dtype; other entries as they are."""
    return {k: (v.to(device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
                if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_micro_step(engine, batch: dict) -> StepResult:
    """forward -> (all ranks agree the loss is finite) -> backward -> step.

    A non-finite loss on any rank drops the micro-batch on every rank before backward, so no
    gradient (and no collective) from it exists anywhere; DeepSpeed's step counts only applied
    micro-batches, so accumulation still sums `grad_accum` good ones.
    """
    out = engine(batch)
    loss = out["loss"]
    if distributed.any_rank(not torch.isfinite(loss.detach()).all().item()):
        return StepResult({}, False)
    engine.backward(loss)
    engine.step()
    return StepResult({k: v.detach().float().mean() for k, v in out.items()}, True)


def train_group_step(engine, batches: list[dict], loss_cfg) -> StepResult:
    """All `grad_accum` micro-batches of one optimizer step with contrastive accumulation
    (pipeline/train/gradcache.py): ITC and SCL see every micro-batch of every rank as negatives."""
    def backward(loss):
        engine.backward(loss)
        engine.step()

    return gradcache.accumulate(engine, backward, batches, loss_cfg)
