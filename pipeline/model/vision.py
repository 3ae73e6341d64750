"""One ViT for images (T=1) and videos (T frames), built on timm's VisionTransformer.

Tokens are laid out frame by frame, `[CLS_t, patch_t1 .. patch_tN]` for t = 1..T, i.e. [B, T, 1+N, D].
Attention pattern: a frame's CLS attends to every token of every frame; a patch token attends only
within its own frame (its patches and its CLS). Two equivalent implementations:

- "factorized": frames attend as a batch of B*T short sequences (all tokens), then the T CLS queries
  attend again over all T*(1+N) keys and replace the frame-local CLS outputs. No mask, so SDPA keeps
  its fused (flash) kernel, and the work is ~1/T of the dense version.
- "dense": one [T(1+N)]² boolean mask through timm's own Block.forward (the reference to test against).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.layers import resample_abs_pos_embed

from pipeline.model import pretrained


def frame_attention_mask(frames: int, tokens_per_frame: int, device=None) -> torch.Tensor:
    """Bool [T*L, T*L], True where query i may attend key j (same frame, or i is a frame CLS)."""
    frame = torch.arange(frames * tokens_per_frame, device=device) // tokens_per_frame
    is_cls = torch.arange(frames * tokens_per_frame, device=device) % tokens_per_frame == 0
    return (frame[:, None] == frame[None, :]) | is_cls[:, None]


def factorized_attention(attn, x: torch.Tensor, frames: int) -> torch.Tensor:
    """timm `Attention` forward on x [B*T, L, C] with the frame pattern above (no mask)."""
    bt, n, c = x.shape
    qkv = attn.qkv(x).reshape(bt, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    drop = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # [B*T, H, L, hd]
    if frames > 1:
        b, h, hd = bt // frames, attn.num_heads, attn.head_dim
        everything = lambda t: t.reshape(b, frames, h, n, hd).transpose(1, 2).reshape(b, h, frames * n, hd)
        q_cls = q[:, :, 0].reshape(b, frames, h, hd).transpose(1, 2)  # [B, H, T, hd]
        cls = F.scaled_dot_product_attention(q_cls, everything(k), everything(v), dropout_p=drop)
        cls = cls.transpose(1, 2).reshape(bt, h, 1, hd)
        out = torch.cat([cls, out[:, :, 1:]], dim=2)
    out = attn.norm(out.transpose(1, 2).reshape(bt, n, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def block_forward(blk, x: torch.Tensor, frames: int, mode: str) -> torch.Tensor:
    """One timm Block on x [B, T, L, C] with the frame attention pattern."""
    b, t, n, c = x.shape
    if mode == "dense" and frames > 1:
        mask = frame_attention_mask(frames, n, x.device)
        return blk(x.reshape(b, t * n, c), attn_mask=mask).reshape(b, t, n, c)
    x = x.reshape(b * t, n, c)
    x = x + blk.drop_path1(blk.ls1(factorized_attention(blk.attn, blk.norm1(x), frames)))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x.reshape(b, t, n, c)


class FlexibleViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.depth > cfg.pretrained_depth and cfg.pretrained != pretrained.NONE:
            raise ValueError(f"model.vision.depth={cfg.depth} > pretrained_depth={cfg.pretrained_depth}")
        vit = timm.create_model(cfg.timm_name, pretrained=False, num_classes=0, img_size=cfg.image_size,
                                dynamic_img_size=True, drop_path_rate=cfg.drop_path, patch_size=cfg.patch_size,
                                embed_dim=cfg.width, num_heads=cfg.heads, depth=cfg.depth)
        if cfg.pretrained != pretrained.NONE:  # the first `depth` blocks; the positions resampled to image_size
            pretrained.load_vision(vit, cfg)
        if vit.cls_token is None or getattr(vit, "no_embed_class", False) or vit.num_prefix_tokens != 1:
            raise ValueError(f"{cfg.timm_name}: need exactly one class token with its own position embedding")
        self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed
        self.norm_pre, self.blocks, self.norm = vit.norm_pre, vit.blocks, vit.norm
        self.temporal_embed = nn.Parameter(torch.zeros(cfg.max_frames, cfg.width))
        self.width, self.patch_size = cfg.width, cfg.patch_size
        self.grad_checkpointing = False

    def num_patches(self, height: int, width: int) -> int:
        return (height // self.patch_size) * (width // self.patch_size)

    def pos_embed_for(self, grid) -> torch.Tensor:
        """[1, 1+N, C] positional embedding for a patch grid, bicubically resampled when it differs."""
        stored = self.patch_embed.grid_size
        if tuple(grid) == tuple(stored):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=list(stored),
                                      num_prefix_tokens=1)

    def forward(self, pixels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """pixels [B, T, 3, H, W] -> tokens [B, T, 1+N', C]; `keep` [B, N'] drops the other patches
        (the same positions in every frame) before the blocks, MAE-style."""
        b, t = pixels.shape[:2]
        if t > self.temporal_embed.shape[0]:
            raise ValueError(f"{t} frames > model.vision.max_frames={self.temporal_embed.shape[0]}")
        x = self.patch_embed(pixels.flatten(0, 1))  # [B*T, gh, gw, C]
        grid = x.shape[1:3]
        pos = self.pos_embed_for(grid)
        x = x.reshape(b, t, grid[0] * grid[1], -1) + pos[:, None, 1:]
        if keep is not None:
            x = torch.gather(x, 2, keep[:, None, :, None].expand(b, t, keep.shape[1], x.shape[-1]))
        cls = (self.cls_token + pos[:, :1]).expand(b, t, 1, -1)
        x = torch.cat([cls, x], dim=2) + self.temporal_embed[:t, None, :]
        x = self.norm_pre(x)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block_forward, blk, x, t, self.cfg.attention,
                                                      use_reentrant=False)
            else:
                x = block_forward(blk, x, t, self.cfg.attention)
        return self.norm(x)
