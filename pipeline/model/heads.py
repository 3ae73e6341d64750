"""Small heads on top of the encoders and the fusion."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block


class Pooler(nn.Module):
    """Linear + Tanh on a global token (METER / BERT pooler)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense, self.act = nn.Linear(dim, dim), nn.Tanh()

    def forward(self, x):
        return self.act(self.dense(x))


class ProjectionHead(nn.Module):
    """Linear-LN-GELU-Linear to the contrastive space (the reference's ITC projection)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, out_dim))

    def forward(self, x):
        return self.net(x)


class MLMHead(nn.Module):
    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, x):
        return self.decoder(self.transform(x))


class MVMDecoder(nn.Module):
    """A light MAE decoder: one transformer block per frame over visible tokens + mask tokens.

    Positions are MAE's fixed 2-D sin-cos embedding of the patch grid: no parameters to resample,
    and nothing read from the encoder outside its forward (ZeRO-3 gathers weights only there).
    """

    def __init__(self, enc_dim: int, dim: int, heads: int, patch_size: int):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.block = Block(dim, heads)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens, keep, grid):
        """tokens [B, T, 1+K, C] (visible), keep [B, K], grid (gh, gw) -> pixels [B, T, N, p*p*3]."""
        b, t, _, _ = tokens.shape
        n = grid[0] * grid[1]
        x = self.mask_token.expand(b, t, n + 1, -1).clone()
        vis = self.embed(tokens)
        x[:, :, 0] = vis[:, :, 0]
        idx = keep[:, None, :, None].expand(b, t, keep.shape[1], x.shape[-1])
        x = x.scatter(2, idx + 1, vis[:, :, 1:])
        pos = build_sincos2d_pos_embed(list(grid), x.shape[-1], device=x.device, dtype=x.dtype)
        x = torch.cat([x[:, :, :1], x[:, :, 1:] + pos], dim=2).flatten(0, 1)
        x = self.norm(self.block(x))
        return self.pred(x[:, 1:]).reshape(b, t, n, -1)
