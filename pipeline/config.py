"""One typed configuration for model, objectives, data and training.

Defaults are the paper's `base` recipe; YAML files in `pipeline/configs/` override them and
dotted CLI overrides (`model.fusion_layers=2`) override the YAML. Unknown keys are errors.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class VisionConfig:
    # timm architecture name (with an optional .tag for `pretrained: hub`); the geometry fields below
    # override its defaults. base: OpenAI CLIP ViT-B/16, whose MLPs use QuickGELU, as the paper.
    timm_name: str = "vit_base_patch16_clip_quickgelu_224.openai"
    # "hub" = timm's weights for timm_name's tag; a local weights file; "none" = random init (explicit:
    # an empty value is an error, so a tower never trains from scratch by omission)
    pretrained: str = "hub"
    width: int = 768
    depth: int = 11  # the reference keeps 11 of CLIP's 12 blocks
    pretrained_depth: int = 12  # blocks in the pretrained weights (checked); the first `depth` are loaded
    heads: int = 12
    patch_size: int = 16
    image_size: int = 288  # pre-training resolution; positional embeddings resampled bicubically
    max_frames: int = 8
    attention: str = "factorized"  # "factorized" (frame-batched + global CLS) or "dense" (one masked pass)
    drop_path: float = 0.0


@dataclass
class TextConfig:
    # a hub name or directory for RobertaModel.from_pretrained; "none" = random init from the geometry below
    pretrained: str = "roberta-base"
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    vocab_size: int = 50265  # must equal the tokenizer's length (checked when the model is built)
    max_len: int = 50
    pad_token_id: int = 1  # RoBERTa's <pad>; the tokenizer must agree
    dropout: float = 0.1


@dataclass
class FusionConfig:
    layers: int = 6
    hidden: int = 768
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    # Init std of the new modules (fusion, poolers, heads); 0 = 1/sqrt(hidden). The reference's is 0.02.
    init_std: float = 0.0


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    itc_dim: int = 512
    itc_temp_init: float = 0.07
    mvm_decoder_dim: int = 256  # light MAE decoder, built only when loss.mvm > 0
    # Towers without pretrained weights: "scaled" = the fusion's rule (std fusion.init_std, 0 = 1/sqrt(width));
    # "library" = timm's / transformers' own init (std 0.02), whose narrow towers start collapsed.
    scratch_init: str = "scaled"


@dataclass
class LossConfig:
    # A named set of weights and ITM pairing (LOSS_PRESETS below, with where each comes from); keys
    # set beside it, or in a later file or override, win over it. A zero weight skips the term.
    preset: str = "light_scl"
    itc: float = 0.5
    itm: float = 1.0
    mlm: float = 1.0
    scl_vision: float = 0.1
    scl_text: float = 0.1
    mvm: float = 0.0  # masked vision modeling, off by default
    itm_negatives: str = "random"  # "random" (the reference's) or "hard" (ALBEF: from softmax(ITC sim / τ))
    # "triplet": every pair, one negative text and one negative image (1:2, three fusion rows per pair);
    # "swap": half of the pairs get another image of the batch (1:1, one row per pair; the released code's)
    itm_pairs: str = "triplet"
    mlm_prob: float = 0.15
    mlm_whole_word: bool = True  # MLM picks whole words (the tokenizer's word ids), all their tokens at once
    # Retrieval fine-tuning (METER's irtr): a ranking head initialised from the ITM head (which stays
    # frozen) scores each image with its caption and `irtr_negatives` random other captions (cross-
    # entropy over them); `itc` then weighs the image-to-text ITC over those captions.
    irtr: float = 0.0
    irtr_negatives: int = 15
    scl_text_ratio: float = 0.4
    scl_patch_ratio: float = 0.8
    scl_temperature: float = 0.03
    schedule: str = "fused"  # "fused" (encode once) or "naive" (one full forward per objective)


@dataclass
class SourceConfig:
    name: str = ""
    shards: str = ""  # brace pattern, local path or any URL/pipe webdataset understands
    modality: str = "image"  # "image" or "video"
    weight: float = 1.0
    num_samples: int = 0  # 0 = read from sizes.json / *_stats.json beside the shards
    shuffle_buffer: int = 0  # 0 = data.shuffle_buffer; each worker holds this many encoded samples


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    tokenizer: str = "roberta-base"  # local tokenizer directory or hub name
    image_size: int = 288
    video_size: int = 224
    num_frames: int = 4
    batch_size: int = 32  # per rank, per micro-step
    workers: int = 4
    mixing: str = "alternate"  # "alternate" (deterministic by weight) or "sample" (per-step sampling)
    sharding: str = "resample"  # "resample" (with replacement) or "split" (each sample once per epoch)
    epoch_samples: int = 0  # 0 = total of the sources' counts
    shuffle_buffer: int = 1000  # samples shuffled together (a block of consecutive samples, per worker)
    seed: int = 0
    # `pipe:` shard URLs run a shell command (e.g. "pipe:aws s3 cp s3://bucket/{00000..00099}.tar -"): only
    # with this set, so that a config from elsewhere cannot run commands
    allow_pipe: bool = False
    crop_scale: tuple[float, float] = (0.8, 1.0)  # RandomResizedCrop area range for training (released: 0.8-1)
    hflip: bool = True  # random horizontal flip in training (the released `clip` transform flips)
    # images (and stored video frames) whose header announces more pixels are skipped and counted
    # ("image_too_large") before decoding; 0 = no limit
    max_image_pixels: int = 40_000_000
    # timm RandAugment for training images ("" = off), e.g. "rand-m3-n2-p1.0": 2 ops at 3/10 of timm's
    # ranges, always applied, from timm's set without Invert (the released fine-tuning's RandAugment(2, 9/30))
    randaugment: str = ""
    prefetch: int = 2  # batches each DataLoader worker prepares ahead


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    steps: int = 100_000
    lr: float = 2e-5  # backbone learning rate
    head_lr_mult: float = 5.0  # fusion layers and heads
    task_head_lr_mult: float = 0.0  # a fine-tuning task's own head (VQA classifier ...); 0 = head_lr_mult
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 10_000
    decay: str = "linear"  # "linear" or "cosine"
    min_lr_ratio: float = 0.0
    # Samples per optimizer step over all ranks: the accumulation steps are derived from it, the
    # micro-batch (data.batch_size) and the world size at start (`accumulation`); 0 = use grad_accum.
    global_batch: int = 0
    grad_accum: int = 1  # micro-batches per optimizer step when global_batch is 0
    # ITC and SCL negatives across all grad_accum micro-batches of a step (pipeline/train/gradcache.py):
    # the gradient of one step on the whole batch, for one extra no-grad contrastive forward.
    contrastive_accum: bool = False
    grad_clip: float = 0.0  # global-norm clipping; 0 = off (the reference does not clip)
    precision: str = "bf16"  # "bf16", "fp16" or "fp32"
    zero_stage: int = 2
    ds_config: str = ""  # a ds_configs/*.json file; "" = ds_configs/zero{stage}_{precision}.json
    offload_optimizer: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    eval_every: int = 0
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    seed: int = 0
    resume: str = "auto"  # "auto", "none" or a checkpoint directory
    # Stopped by SIGTERM / SIGUSR2 inside a SLURM batch job (time limit, preemption): requeue it at most
    # this many times (srun and the launchers; slurm/submit.py has its own --max-requeues)
    max_requeues: int = 10


@dataclass
class EvalConfig:
    data: str = ""  # eval shards (brace pattern) or an annotation file
    modality: str = "image"
    num_samples: int = 0
    itm_rerank_k: int = 16  # candidates re-scored per query; 0 = ITC only
    # top-k score: "itc_itm" (ITC logit + ITM log-odds, ALBEF), "itm" (METER's zero-shot) or "rank" (the
    # ranking head of retrieval fine-tuning, loss.irtr)
    rerank: str = "itc_itm"
    batch_size: int = 64


@dataclass
class TaskConfig:
    """A downstream task (pipeline/finetune.py); unused by pre-training."""
    name: str = ""  # "vqa", "nlvr2" or "retrieval"
    init: str = ""  # pre-training run directory, step_* checkpoint or consolidated fp32 file
    train: str = ""  # annotation file of each split (formats: see pipeline/tasks/<name>.py)
    val: str = ""
    test: str = ""
    train_questions: str = ""  # VQAv2 official layout: the questions file beside each annotations file
    val_questions: str = ""
    test_questions: str = ""
    train_ids: str = ""  # MSR-VTT with MSRVTT_data.json: the training video ids (9k list or CLIP4Clip csv)
    media_root: str = ""  # images (or videos) folder the annotation paths are relative to
    modality: str = "image"
    answers: str = ""  # VQA: answer vocabulary json (python -m pipeline.tasks.vqa vocab ...)
    metric: str = ""  # the best checkpoint's eval metric; "" = the task's own
    predictions: str = "predictions.json"  # test predictions (file name in the output directory)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


class ConfigError(ValueError):
    pass


# Loss weight sets, by name (`loss.preset`). Each says where its numbers come from; bench/RESULTS.md
# ("Loss presets") holds the ablation that chose base's default.
LOSS_PRESETS = {
    # The paper's stated weights (ITC 0.5 as the released config's con_weight, SCL 1 per term) with
    # the released code's ITM pairing.
    "paper": dict(itc=0.5, itm=1.0, mlm=1.0, scl_vision=1.0, scl_text=1.0, itm_pairs="swap"),
    # What the released code trained on 8 GPUs: its all-gather returns only the local slice in
    # backward and DDP averages over ranks, so ITC and both SCL gradients are 1/8 of their stated
    # weights (0.5/8, 1/8). The image SCL term is kept at the text term's weight, as the paper intends.
    "released": dict(itc=0.0625, itm=1.0, mlm=1.0, scl_vision=0.125, scl_text=0.125, itm_pairs="swap"),
    # The same, literally: image features [B, 1, D] normalised over the frame axis become sign vectors,
    # so the released image SCL term has (almost) no gradient.
    "released_literal": dict(itc=0.0625, itm=1.0, mlm=1.0, scl_vision=0.0, scl_text=0.125, itm_pairs="swap"),
    # SCL at 0.1 so that ITM keeps the shared fusion when training from scratch (this project's first default).
    "light_scl": dict(itc=0.5, itm=1.0, mlm=1.0, scl_vision=0.1, scl_text=0.1, itm_pairs="triplet"),
}


def _apply_layer(tree: dict, layer: dict) -> dict:
    """Merge one config layer (a YAML file or the overrides) into `tree`. A `loss.preset` in the layer
    first resets the weights to that preset, so keys set beside it or in later layers win over it."""
    preset = (layer.get("loss") or {}).get("preset") if isinstance(layer.get("loss"), dict) else None
    if preset is not None:
        if preset not in LOSS_PRESETS:
            raise ConfigError(f"loss.preset={preset!r} must be one of {tuple(LOSS_PRESETS)}")
        tree = _deep_merge(tree, {"loss": LOSS_PRESETS[preset]})
    return _deep_merge(tree, layer)


def _coerce(tp, value, where: str):
    """Build a value of annotated type `tp` from plain YAML data, naming `where` on errors."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _from_dict(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}' (valid keys here: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _nested_update(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides) -> dict:
    """`["model.fusion.layers=2", "train.lr=1e-4"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        _nested_update(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_path(path: str | Path) -> Path:
    """A config name (`tiny`) or a path to a YAML file."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    named = CONFIG_DIR / f"{p.name}.yaml" if p.suffix == "" else CONFIG_DIR / p.name
    if named.exists():
        return named
    raise ConfigError(f"config '{path}' not found (named configs: "
                      f"{', '.join(sorted(q.stem for q in CONFIG_DIR.glob('*.yaml')))})")


def _parse_yaml(text: str, where) -> dict:
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}".replace("<unicode string>", str(where))) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: top level must be a mapping")
    return tree


def load_yaml_tree(path: str | Path | None, text: str | None = None) -> dict:
    """The YAML (a file, or `text` read from elsewhere) as a dict, following `inherit: <config>` chains
    (child keys win)."""
    if path is None and text is None:
        return {}
    tree = _parse_yaml(text, path or "config text") if text is not None else \
        _parse_yaml(resolve_path(path).read_text(), resolve_path(path))
    parent = tree.pop("inherit", None)
    return _apply_layer(load_yaml_tree(parent) if parent else {}, tree)


def load_config(path: str | Path | None = None, overrides=(), text: str | None = None) -> Config:
    """Defaults <- YAML (a file with `inherit:`, or `text`) <- dotted overrides, validated into a typed Config."""
    tree = _apply_layer(load_yaml_tree(path, text), parse_overrides(overrides))
    cfg = _coerce(Config, tree, "")
    validate(cfg)
    return cfg


def _choice(value, allowed, name):
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} must be one of {allowed}")


def _validate_data(d: DataConfig) -> None:
    names = [s.name for s in d.sources if s.name]
    if len(names) != len(set(names)):
        raise ConfigError(f"data.sources: names must be unique, got {names}")
    for i, s in enumerate(d.sources):
        where = f"data.sources[{s.name or i}]"
        _choice(s.modality, ("image", "video"), f"{where}.modality")
        if not s.shards:
            raise ConfigError(f"{where}.shards is empty")
        if s.weight <= 0 or s.num_samples < 0 or s.shuffle_buffer < 0:
            raise ConfigError(f"{where}: weight must be > 0, num_samples and shuffle_buffer >= 0")
    if not d.allow_pipe:
        for i, s in enumerate(d.sources):
            check_pipe(s.shards, f"data.sources[{s.name or i}].shards")
    if d.sharding == "split":
        # One pass over every source per epoch: the epoch length and the mix follow the counts.
        if len({s.weight for s in d.sources}) > 1:
            raise ConfigError("data.sharding=split reads every source once per epoch; "
                              "source weights apply only to data.sharding=resample")
        if d.epoch_samples:
            raise ConfigError("data.epoch_samples applies only to data.sharding=resample")
    lo, hi = d.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale={d.crop_scale} must satisfy 0 < min <= max <= 1")
    if d.batch_size < 1 or d.workers < 0 or d.prefetch < 1 or d.shuffle_buffer < 1 or d.epoch_samples < 0:
        raise ConfigError("data: batch_size, prefetch and shuffle_buffer must be >= 1; "
                          "workers and epoch_samples >= 0")


def check_pipe(shards: str, where: str, allowed: bool = False) -> None:
    """A `pipe:` URL runs a shell command: refused unless data.allow_pipe is true."""
    if not allowed and "pipe:" in shards:
        raise ConfigError(f"{where}={shards!r} runs a shell command (pipe:): set data.allow_pipe: true "
                          "if you trust where this config came from")


def validate(cfg: Config) -> None:
    _choice(cfg.model.vision.attention, ("factorized", "dense"), "model.vision.attention")
    _choice(cfg.loss.itm_negatives, ("hard", "random"), "loss.itm_negatives")
    _choice(cfg.model.scratch_init, ("scaled", "library"), "model.scratch_init")
    _choice(cfg.loss.schedule, ("fused", "naive"), "loss.schedule")
    _choice(cfg.eval.rerank, ("itc_itm", "itm", "rank"), "eval.rerank")
    _choice(cfg.loss.preset, tuple(LOSS_PRESETS), "loss.preset")
    _choice(cfg.loss.itm_pairs, ("triplet", "swap"), "loss.itm_pairs")
    for key, value in (("model.vision.pretrained", cfg.model.vision.pretrained),
                       ("model.text.pretrained", cfg.model.text.pretrained)):
        if not value.strip():
            raise ConfigError(f"{key} is empty: name the weights (hub name, local file or directory), or "
                              "set it to none to train this tower from random weights")
    _choice(cfg.task.name, ("", "vqa", "nlvr2", "retrieval"), "task.name")
    _choice(cfg.task.modality, ("image", "video"), "task.modality")
    _choice(cfg.train.precision, ("bf16", "fp16", "fp32"), "train.precision")
    _choice(cfg.train.decay, ("linear", "cosine"), "train.decay")
    _choice(cfg.train.zero_stage, (0, 1, 2, 3), "train.zero_stage")
    _choice(cfg.data.mixing, ("alternate", "sample"), "data.mixing")
    _choice(cfg.data.sharding, ("resample", "split"), "data.sharding")
    _validate_data(cfg.data)
    check_pipe(cfg.eval.data, "eval.data", cfg.data.allow_pipe)
    if not 0 < cfg.data.num_frames <= cfg.model.vision.max_frames:
        raise ConfigError(f"data.num_frames={cfg.data.num_frames} must be in 1..model.vision.max_frames"
                          f"={cfg.model.vision.max_frames}")
    if cfg.train.contrastive_accum:
        if cfg.loss.schedule != "fused":
            raise ConfigError("train.contrastive_accum needs loss.schedule=fused")
        if not any(getattr(cfg.loss, k) > 0 for k in ("itc", "scl_vision", "scl_text")):
            raise ConfigError("train.contrastive_accum=true but loss.itc, loss.scl_vision and loss.scl_text are all 0")
    for name in ("scl_text_ratio", "scl_patch_ratio", "mlm_prob"):
        if not 0.0 <= getattr(cfg.loss, name) < 1.0:
            raise ConfigError(f"loss.{name} must be in [0, 1)")
    if cfg.loss.irtr_negatives < 1:
        raise ConfigError("loss.irtr_negatives must be >= 1")
    if cfg.loss.irtr > 0 and cfg.task.name != "retrieval":
        raise ConfigError(f"loss.irtr={cfg.loss.irtr} is retrieval fine-tuning's objective (task.name=retrieval), "
                          f"not {cfg.task.name or 'pre-training'}'s")
    t = cfg.train
    if t.steps < 1:
        raise ConfigError(f"train.steps={t.steps}: a run trains at least one step")
    if t.global_batch < 0 or t.grad_accum < 1:
        raise ConfigError("train.global_batch must be >= 0 and train.grad_accum >= 1")
    if t.global_batch and t.grad_accum != 1:
        raise ConfigError(f"train.global_batch={t.global_batch} and train.grad_accum={t.grad_accum} are both set: "
                          "the accumulation is derived from the global batch; set one of them")
    if cfg.data.randaugment:
        from pipeline.data.image import randaugment

        randaugment(cfg.data.randaugment)  # a malformed string fails here, not in a loader worker


def accumulation(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank: train.global_batch / (data.batch_size x world
    size) when the global batch is set (it must divide), else train.grad_accum."""
    t, micro = cfg.train, cfg.data.batch_size
    if not t.global_batch:
        return t.grad_accum
    if t.global_batch % (micro * world_size):
        raise ConfigError(f"train.global_batch={t.global_batch} is not a multiple of data.batch_size={micro} x "
                          f"{world_size} ranks = {micro * world_size}: change one of the three")
    return t.global_batch // (micro * world_size)


def batch_line(cfg: Config, world_size: int) -> str:
    """`global batch 4096 = 16 per rank x 64 ranks x 4 accumulation steps`."""
    micro, accum = cfg.data.batch_size, accumulation(cfg, world_size)
    return (f"global batch {micro * world_size * accum} = {micro} per rank x {world_size} ranks x "
            f"{accum} accumulation steps")


# Model keys that shape initialisation or training only: a trained model computes the same without them.
_TRAINING_ONLY = {"pretrained", "pretrained_depth", "drop_path", "dropout", "init_std"}


def model_differences(saved: dict, current: dict, prefix: str = "model") -> list[str]:
    """`model` sections of two configs (dicts) -> the keys whose values differ, each with both
    values. Weights of another geometry can still load (e.g. another head count), so evaluation and
    fine-tuning compare the run's section with theirs before trusting a checkpoint."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in _TRAINING_ONLY:
            continue
        a, b, name = saved.get(key), current.get(key), f"{prefix}.{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += model_differences(a, b, name)
        elif a != b:
            out.append(f"{name}: checkpoint {a!r}, this config {b!r}")
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what `--print-config` prints and a run writes to config.yaml)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))
