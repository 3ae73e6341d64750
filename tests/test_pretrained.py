"""Pretrained towers load from files in the exact formats the hubs serve, made here from random weights:
timm's `model.safetensors` for base's vision tower (vit_base_patch16_clip_quickgelu_224.openai), an
OpenAI-CLIP state dict, and `save_pretrained` directories of RoBERTa. Every tensor of the tower comes
from the file; whatever the file holds beyond it is named in the log."""
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.config import ConfigError, load_config
from pipeline.model.pretrained import PretrainedError, read_state_dict
from pipeline.model.text import TextEncoder
from pipeline.model.vision import FlexibleViT


@pytest.fixture(scope="module")
def clip_vit_file(tmp_path_factory):
    """timm's hub file for OpenAI's CLIP ViT-B/16: 12 blocks at 224 px, the 512-d projection as `head`."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=512)
    path = tmp_path_factory.mktemp("hub") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def test_base_vision_tower_takes_every_tensor_of_the_hub_file(clip_vit_file, caplog):
    state = read_state_dict(clip_vit_file)
    cfg = load_config("base", [f"model.vision.pretrained={clip_vit_file}"]).model.vision
    with caplog.at_level(logging.INFO, logger="pipeline.model"):
        vit = FlexibleViT(cfg)
    own = dict(vit.named_parameters())
    assert len(vit.blocks) == 11
    for name, value in own.items():
        if name == "temporal_embed":  # the video tower's own, not in CLIP
            continue
        if name == "pos_embed":  # 14x14 patches resampled to 288 px's 18x18; the class position kept
            assert value.shape == (1, 1 + 18 * 18, 768)
            assert torch.equal(value[:, 0], state[name][:, 0])
            continue
        assert torch.equal(value, state[name]), name
    assert len(own) - 1 == len(state) - 12 - 2  # all but block 11 (12 tensors) and the head (2)
    log = caplog.text
    assert f"vision tower: {len(state) - 14} tensors from {clip_vit_file}" in log, log
    left = log.split("left out: ")[1].strip()
    assert sorted(left.split(", ")) == ["blocks.11.* (12 tensors)", "head.bias", "head.weight"], log


def test_an_openai_clip_file_names_its_text_tower_as_left_out(tmp_path, caplog):
    """The OpenAI / OpenCLIP key layout (visual.*, and the text tower beside it) at a small geometry."""
    torch.manual_seed(1)
    vit = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=0, img_size=32,
                            patch_size=8, embed_dim=64, depth=2, num_heads=2)
    s = vit.state_dict()
    state = {"visual.class_embedding": s["cls_token"][0, 0], "visual.positional_embedding": s["pos_embed"][0],
             "visual.conv1.weight": s["patch_embed.proj.weight"], "visual.ln_pre.weight": s["norm_pre.weight"],
             "visual.ln_pre.bias": s["norm_pre.bias"], "visual.ln_post.weight": s["norm.weight"],
             "visual.ln_post.bias": s["norm.bias"], "visual.proj": torch.randn(64, 32),
             "token_embedding.weight": torch.randn(100, 32), "positional_embedding": torch.randn(16, 32),
             "text_projection": torch.randn(32, 32), "logit_scale": torch.ones([])}
    for i in range(2):
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "attn.in_proj"),
                             ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                state[f"visual.transformer.resblocks.{i}.{theirs}{'_' if 'in_proj' in theirs else '.'}{p}"] = \
                    s[f"blocks.{i}.{ours}.{p}"]
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    cfg = load_config("tiny", [f"model.vision.pretrained={path}", "model.vision.pretrained_depth=2"]).model.vision
    with caplog.at_level(logging.INFO, logger="pipeline.model"):
        tower = FlexibleViT(cfg)
    assert torch.equal(tower.blocks[1].attn.qkv.weight, s["blocks.1.attn.qkv.weight"])
    assert torch.equal(tower.cls_token, s["cls_token"])
    for name in ("head.weight", "token_embedding.weight", "positional_embedding", "text_projection", "logit_scale"):
        assert name in caplog.text, (name, caplog.text)


def test_base_text_tower_takes_every_tensor_of_a_save_pretrained_directory(tmp_path, caplog):
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(2)
    model = RobertaModel(RobertaConfig())  # roberta-base's geometry, with its pooler
    model.save_pretrained(tmp_path / "roberta")
    saved = model.state_dict()
    cfg = load_config("base", [f"model.text.pretrained={tmp_path / 'roberta'}"]).model.text
    with caplog.at_level(logging.INFO, logger="pipeline.model"):
        tower = TextEncoder(cfg)
    own = tower.roberta.state_dict()
    assert own and all(torch.equal(v, saved[k]) for k, v in own.items())
    assert set(saved) - set(own) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert "left out: pooler.dense.* (2 tensors)" in caplog.text, caplog.text


def test_the_hub_layout_of_roberta_names_its_lm_head(tmp_path, caplog):
    """roberta-base on the hub is a RobertaForMaskedLM checkpoint (`roberta.` prefix, an LM head)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    conf = RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=26)
    RobertaForMaskedLM(conf).save_pretrained(tmp_path / "mlm")
    cfg = load_config("tiny", [f"model.text.pretrained={tmp_path / 'mlm'}"]).model.text
    with caplog.at_level(logging.INFO, logger="pipeline.model"):
        tower = TextEncoder(cfg)
    assert tower.width == 64
    assert "lm_head" in caplog.text, caplog.text


class _Payload:
    """Unpickling this opens (creates) a marker file: code run by loading a weights file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_weights_file_that_would_run_code_is_refused_and_runs_none(tmp_path):
    path, marker = tmp_path / "vit.pth", tmp_path / "ran"
    torch.save({"cls_token": torch.zeros(1, 1, 64), "extra": _Payload(marker)}, path)
    with pytest.raises(PretrainedError, match="vit.pth: not a plain state dict"):
        read_state_dict(path)
    cfg = load_config("tiny", [f"model.vision.pretrained={path}"]).model.vision
    with pytest.raises(PretrainedError, match="vit.pth"):
        FlexibleViT(cfg)
    assert not marker.exists()


def test_an_empty_pretrained_value_is_an_error_naming_the_key():
    for key in ("model.vision.pretrained", "model.text.pretrained"):
        with pytest.raises(ConfigError, match=f"{key} is empty.*none"):
            load_config("base", [f"{key}="])
    assert load_config("base").model.vision.pretrained == "hub"
    assert load_config("base").model.text.pretrained == "roberta-base"
    assert load_config("tiny").model.vision.pretrained == "none"
