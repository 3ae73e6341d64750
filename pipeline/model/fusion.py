"""METER-style co-attention fusion: two streams, each layer self-attn -> cross-attn -> FFN.

Both streams are updated in parallel from the previous layer's outputs. Attention runs through
`scaled_dot_product_attention`; a key mask is passed only where keys can be padding (text), so
vision keys keep SDPA on its fused kernel.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, ctx, key_mask=None):
        """`key_mask` [B, Lk] bool, True where the key may be attended (None: all keys)."""
        b, lq, d = x.shape
        split = lambda t: t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(ctx)), split(self.v(ctx)),
                                           attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, lq, d))


class CrossLayer(nn.Module):
    """BERT-style post-norm layer with a cross-attention block (METER's BertCrossLayer)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.self_attn, self.cross_attn = Attention(dim, heads, dropout), Attention(dim, heads, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, x_mask, y, y_mask):
        x = self.norm1(x + self.drop(self.self_attn(x, x, x_mask)))
        x = self.norm2(x + self.drop(self.cross_attn(x, y, y_mask)))
        return self.norm3(x + self.drop(self.mlp(x)))


class CoAttentionFusion(nn.Module):
    """Projects each stream to the fusion width, adds token-type embeddings, runs L paired layers."""

    def __init__(self, text_dim: int, vision_dim: int, dim: int, layers: int, heads: int,
                 mlp_ratio: float, dropout: float):
        super().__init__()
        self.text_in, self.vision_in = nn.Linear(text_dim, dim), nn.Linear(vision_dim, dim)
        self.token_type = nn.Embedding(2, dim)
        self.text_layers = nn.ModuleList(CrossLayer(dim, heads, mlp_ratio, dropout) for _ in range(layers))
        self.vision_layers = nn.ModuleList(CrossLayer(dim, heads, mlp_ratio, dropout) for _ in range(layers))

    def forward(self, text, text_mask, vision, vision_type=1):
        """text [B, Lt, Dt] with text_mask [B, Lt] (True = real token); vision [B, Lv, Dv] (no padding);
        `vision_type`: the vision tokens' token type, an int or a [B] tensor (text tokens are type 0)."""
        t = self.text_in(text) + self.token_type.weight[0]
        types = self.token_type.weight[vision_type]
        v = self.vision_in(vision) + (types if types.dim() == 1 else types[:, None])
        text_mask = text_mask.bool()
        for t_layer, v_layer in zip(self.text_layers, self.vision_layers):
            t, v = t_layer(t, text_mask, v, None), v_layer(v, None, t, text_mask)
        return t, v
