"""One YAML per corpus (dataprep/configs/<name>.yaml); command-line values override it.

String values may name other values in braces: `output_dir: "{data_root}/shards/{name}"`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .common import DataprepError

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class CorpusConfig:
    name: str
    modality: str = "image"  # image | video
    format: str = "generic"  # a key of readers.READERS
    input: str = ""  # the annotation file
    reader: dict = field(default_factory=dict)  # the reader's own options (image_root, splits, ...)
    url_template: str | None = None  # rebuild each row's URL from its columns (mirrors)
    path_template: str | None = None  # or its local path
    data_root: str = "data"
    output_dir: str = "{data_root}/shards/{name}"
    eval_input: str | None = None  # a held-out split, prepared the same way into eval_output_dir
    eval_output_dir: str | None = None
    eval_reader: dict = field(default_factory=dict)  # reader options that differ for the eval split
    shard_size: int = 10000
    # who runs the shards: this machine's processes, or a Spark standalone cluster (dataprep/spark.py)
    distributor: str = "multiprocessing"  # multiprocessing | spark
    spark_master: str | None = None  # spark://HOST:PORT, with distributor: spark
    processes: int = 1
    threads: int = 32
    retries: int = 2
    timeout: float = 10
    # A later download writes a shard again while its rows failed for a reason worth retrying (timeouts,
    # refused or reset connections, 5xx, 408, 429), at most this many times; validate fails until then
    retry_rounds: int = 2
    min_success: float = 0.0  # validate fails for a shard whose share of downloaded rows is below this
    # URLs of local files (file://) and of loopback, private or link-local addresses are refused unless
    # true (dataprep/urls.py): for a trusted intranet mirror or a loopback test server
    allow_private_urls: bool = False
    incremental: bool = True  # skip finished shards; False starts the shard folder afresh
    table_changed: str = "error"  # or "fresh": when the table differs from the one the shards came from
    # images (img2dataset's options)
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    min_image_size: int = 0
    max_aspect_ratio: float = float("inf")
    encode_quality: int = 95
    # videos
    video_size: int = 224
    video_resize_mode: str = "keep_ratio"
    fps: float | None = 8.0
    max_duration: float = 10.0
    max_source_duration: float | None = None
    # cheap reading (dataprep/README.md, "Shard format"): a keyframe every N frames, no B-frames
    # (null: x264's own GOP), and K JPEG frames stored beside each clip (0: none)
    video_keyframe_interval: int | None = 4
    video_frames: int = 8
    video_frame_quality: int = 90
    max_bytes: int = 512 << 20
    # the embedded default: synthetic.generate()'s arguments, plus `root`; `run` serves root on loopback
    synthetic: dict | None = None

    def resolved(self) -> "CorpusConfig":
        """Fill the {placeholders} in string values from the scalar values."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, (str, int, float))}

        def fill(v: Any, depth: int = 0) -> Any:
            if isinstance(v, str) and "{" in v and depth < 5:
                try:
                    return fill(v.format(**values), depth + 1)
                except (KeyError, IndexError):
                    return v  # e.g. a url_template's row fields, filled per row later
            if isinstance(v, dict):
                return {k: fill(x, depth) for k, x in v.items()}
            return v

        out = dataclasses.replace(self)
        for f in dataclasses.fields(self):
            if f.name not in ("url_template", "path_template"):
                setattr(out, f.name, fill(getattr(self, f.name)))
        return out


def config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if named.exists():
        return named
    raise DataprepError(f"no config {name_or_path!r}: not a YAML file, nor one of {available()}")


def available() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML: 3 -> int, true -> bool, null -> None, [a, b] -> list."""
    return yaml.safe_load(text)


def parse_settings(items: list[str], flag: str) -> dict[str, Any]:
    """Command-line `KEY=VALUE` settings (`flag` names where they came from in the error)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise DataprepError(f"{flag} takes KEY=VALUE, not {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> CorpusConfig:
    with open(config_path(name_or_path), encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    data.setdefault("name", Path(name_or_path).stem)
    known = {f.name for f in dataclasses.fields(CorpusConfig)}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        head, _, sub = key.partition(".")
        if head not in known:
            raise DataprepError(f"unknown setting {head!r}; known: {', '.join(sorted(known))}")
        if sub:  # reader.image_root=..., synthetic.n_images=...
            data[head] = {**(data.get(head) or {}), sub: value}
        else:
            data[head] = value
    unknown = set(data) - known
    if unknown:
        raise DataprepError(f"{name_or_path}: unknown settings {sorted(unknown)}")
    if data.get("max_aspect_ratio") in (None, "inf"):
        data.pop("max_aspect_ratio", None)
    cfg = CorpusConfig(**data).resolved()
    if cfg.table_changed not in ("error", "fresh"):
        raise DataprepError(f"table_changed must be error or fresh, not {cfg.table_changed!r}")
    if cfg.distributor not in ("multiprocessing", "spark"):
        raise DataprepError(f"distributor must be multiprocessing or spark, not {cfg.distributor!r}")
    if cfg.distributor == "spark" and not cfg.spark_master:
        raise DataprepError("--distributor spark needs --spark-master spark://HOST:PORT (a standalone master; "
                            "slurm/submit.py --dataprep starts one inside a SLURM allocation)")
    if cfg.modality not in ("image", "video"):
        raise DataprepError(f"modality must be image or video, not {cfg.modality!r}")
    return cfg
