"""Pretrained tower weights, from the files the hubs serve or from local copies of them.

vision  `model.vision.pretrained`: `hub` = the `model.safetensors` of the Hugging Face repo timm names
        for `model.vision.timm_name` (timm's own key layout; base: OpenAI's CLIP ViT-B/16), or a local
        file: safetensors, or a plain state dict saved by torch (read with weights_only=True). timm's
        converter (`checkpoint_filter_fn`) maps OpenAI / OpenCLIP key layouts and resamples the
        positional embedding to the model's patch grid.
text    `model.text.pretrained`: a hub name or a `save_pretrained` directory for
        `RobertaModel.from_pretrained`.

Every tensor of the model must come from the file (a missing one is an error naming it), and every
tensor of the file that the tower does not use is named in the log (the last vision block the
paper drops, the CLIP projection head, a CLIP file's text tower, RoBERTa's pooler and LM head).
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

log = logging.getLogger("pipeline.model")

NONE = "none"  # `pretrained: none` = random init (an empty value is a config error)
HUB = "hub"
HUB_FILE = "model.safetensors"


class PretrainedError(ValueError):
    pass


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch file holding tensors and plain containers
    only (anything else is refused: loading it would run code)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        raise PretrainedError(f"{path}: not a plain state dict of tensors ({type(err).__name__}: "
                              f"{str(err).splitlines()[0]}); convert it to safetensors") from None
    for key in ("state_dict", "model"):  # common wrappers of a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise PretrainedError(f"{path}: expected a mapping of names to tensors")
    return state


def hub_vision_file(timm_name: str) -> str:
    """The local path of the hub file timm names for `timm_name` (downloaded once into the HF cache)."""
    from huggingface_hub import hf_hub_download
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(timm_name)
    if pcfg is None or not pcfg.hf_hub_id:
        raise PretrainedError(f"model.vision.timm_name={timm_name!r}: timm names no Hugging Face weights for it; "
                              "set model.vision.pretrained to a local file")
    return hf_hub_download(pcfg.hf_hub_id, HUB_FILE)


def summarize(names) -> str:
    """`blocks.11.* (12 tensors), head.weight, head.bias`: names grouped by their first two parts."""
    groups = Counter(".".join(n.split(".")[:2]) if n.count(".") > 1 else n for n in names)
    return ", ".join(f"{g}.* ({c} tensors)" if c > 1 else next(n for n in names if n.startswith(g))
                     for g, c in groups.items())


def load_vision(vit: torch.nn.Module, cfg) -> list[str]:
    """Load `cfg.pretrained` (hub or a file) into a timm VisionTransformer built with `cfg.depth`
    blocks. Returns the names of the file's tensors left out (also logged)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    source = hub_vision_file(cfg.timm_name) if cfg.pretrained == HUB else cfg.pretrained
    raw = read_state_dict(source)
    clip_prefix = "visual." if "visual.class_embedding" in raw else None
    state = checkpoint_filter_fn(dict(raw), vit)
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if len(blocks) != cfg.pretrained_depth:
        raise PretrainedError(f"{source}: {len(blocks)} transformer blocks, model.vision.pretrained_depth="
                              f"{cfg.pretrained_depth}")
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing:
        raise PretrainedError(f"{source} lacks {len(missing)} tensors of the vision tower: {summarize(missing)}")
    left = list(unexpected)
    if clip_prefix:  # the text tower and logit scale of a full CLIP file never reach the filter's output
        left += [k for k in raw if not k.startswith(clip_prefix)]
    log.info("vision tower: %d tensors from %s; left out: %s", len(state) - len(unexpected), source,
             summarize(left) if left else "none")
    return left


def load_text(cfg):
    """RobertaModel.from_pretrained(`cfg.pretrained`) without a pooler. Returns (model, left-out names)."""
    from transformers import RobertaModel

    model, info = RobertaModel.from_pretrained(cfg.pretrained, add_pooling_layer=False, attn_implementation="sdpa",
                                               output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing or info.get("mismatched_keys"):
        raise PretrainedError(f"model.text.pretrained={cfg.pretrained!r} does not fit RobertaModel: missing "
                              f"{summarize(missing) or 'none'}, mismatched {info.get('mismatched_keys') or 'none'}")
    left = sorted(info.get("unexpected_keys", []))
    n = sum(1 for _ in model.state_dict())
    log.info("text tower: %d tensors from %s; left out: %s", n, cfg.pretrained, summarize(left) if left else "none")
    return model, left
