"""Checks of a run's inputs before anything expensive starts (process group, DeepSpeed, the model).

Every config-level input is looked at first: the tokenizer (loaded and fitted to the text encoder),
the training shards (they exist and have sample counts), the eval set, the pretrained weight files,
the DeepSpeed config. A name that is neither a local path nor in the Hugging Face cache is an error
at once when the hub cannot be reached, instead of a minute of hub retries after start-up.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from pipeline.config import Config, ConfigError


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (HF_HUB_OFFLINE=1 means no)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_hf_cache(name: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, filename), str)
    except Exception:  # an invalid repo id (e.g. a path that does not exist) is simply not cached
        return False


def require_local_or_hub(name: str, what: str, cache_file: str = "config.json") -> None:
    """`name` (a directory, a file or a hub id) must be loadable: local, cached, or the hub reachable."""
    if Path(name).exists() or _in_hf_cache(name, cache_file):
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path; hub ids are `name` or `org/name`
        raise ConfigError(f"{what}={name!r}: no such file or directory")
    if not hub_reachable():
        raise ConfigError(f"{what}={name!r}: not found locally (no such directory, not in the Hugging Face "
                          f"cache) and no hub access; point it at a local copy")


def check_pretraining_inputs(cfg: Config):
    """Everything `pipeline/pretrain.py` reads from the config, before the process group exists.
    Returns (tokenizer, sources): loaded and resolved here, once, for the training loader."""
    from pipeline.data import load_tokenizer
    from pipeline.data.loader import resolve_sources
    from pipeline.data.tokenizer import check_tokenizer

    check_model_inputs(cfg)
    require_local_or_hub(cfg.data.tokenizer, "data.tokenizer", "tokenizer_config.json")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_tokenizer(tokenizer, cfg.model.text)
    sources = resolve_sources(cfg)
    if cfg.eval.data and cfg.train.eval_every > 0:
        check_eval_set(cfg.eval.data, "eval.data")
    return tokenizer, sources


def check_model_inputs(cfg: Config) -> None:
    """Pretrained weights of the towers: local, in the Hugging Face cache, or the hub reachable."""
    from pipeline.model.pretrained import HUB, HUB_FILE, NONE

    v, t = cfg.model.vision, cfg.model.text
    if v.pretrained not in (NONE, HUB) and not Path(v.pretrained).is_file():
        raise ConfigError(f"model.vision.pretrained={v.pretrained!r}: no such file")
    if v.pretrained == HUB:
        from timm.models import get_pretrained_cfg

        pcfg = get_pretrained_cfg(v.timm_name)
        repo = pcfg.hf_hub_id if pcfg is not None else None
        if not repo:
            raise ConfigError(f"model.vision.pretrained=hub: timm names no hub weights for {v.timm_name!r}")
        if not _in_hf_cache(repo, HUB_FILE) and not hub_reachable():
            raise ConfigError(f"model.vision.pretrained=hub ({repo}/{HUB_FILE}): not in the Hugging Face cache and "
                              "no hub access; download the file elsewhere and set model.vision.pretrained to it")
    if t.pretrained != NONE:
        require_local_or_hub(t.pretrained, "model.text.pretrained")


def check_eval_set(data: str, what: str) -> None:
    """An eval set is an annotation file, or shards (brace patterns and globs, as the loader expands
    them): every local file must exist."""
    from pipeline.data.annotations import ANNOTATION_SUFFIXES
    from pipeline.data.shards import DataError, expand_shards, missing_shards

    if data.endswith(ANNOTATION_SUFFIXES):
        if not Path(data).is_file():
            raise ConfigError(f"{what}={data!r}: no such annotation file")
        return
    try:
        urls = expand_shards(data)
    except DataError as err:
        raise ConfigError(f"{what}: {err}") from None
    missing = missing_shards(urls)
    if missing:
        raise ConfigError(f"{what}={data!r}: {len(missing)} file(s) do not exist: {', '.join(missing[:5])}")
