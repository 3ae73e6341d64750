"""RoBERTa text encoder from transformers: `from_pretrained` (model.text.pretrained), or built from the
config's geometry with random weights (`pretrained: none`)."""
from __future__ import annotations

import torch.nn as nn
from transformers import RobertaConfig, RobertaModel

from pipeline.model import pretrained


class TextEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.pretrained != pretrained.NONE:
            self.roberta, _ = pretrained.load_text(cfg)
        else:
            conf = RobertaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden,
                                 num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                 intermediate_size=cfg.intermediate, hidden_dropout_prob=cfg.dropout,
                                 attention_probs_dropout_prob=cfg.dropout, pad_token_id=cfg.pad_token_id,
                                 # RoBERTa positions start after the padding index
                                 max_position_embeddings=cfg.max_len + cfg.pad_token_id + 1)
            conf._attn_implementation = "sdpa"
            self.roberta = RobertaModel(conf, add_pooling_layer=False)
        got = self.roberta.config
        if (got.vocab_size, got.hidden_size) != (cfg.vocab_size, cfg.hidden):
            raise ValueError(f"text encoder has vocab {got.vocab_size} / hidden {got.hidden_size}, "
                             f"config says {cfg.vocab_size} / {cfg.hidden}")
        self.width = got.hidden_size

    def forward(self, ids, attention_mask):
        """ids, attention_mask [B, L] -> hidden states [B, L, D]."""
        return self.roberta(input_ids=ids, attention_mask=attention_mask).last_hidden_state

    def set_grad_checkpointing(self, on: bool = True):
        if on:
            self.roberta.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.roberta.gradient_checkpointing_disable()
