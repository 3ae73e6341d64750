"""Token and patch masks for MLM and SCL, drawn from an explicit torch.Generator (reproducible).

The loader calls these per sample with a generator seeded from (seed, epoch, sample index), so the
same sample gets the same masks on a resumed run; benchmarks and tests call `make_masks` on a batch.
"""
from __future__ import annotations

import math

import torch

from pipeline.objectives import IGNORE_INDEX


def mlm_mask(ids, maskable, mask_id: int, vocab_size: int, prob: float, generator=None, word_ids=None):
    """BERT's rule: pick `prob` of the maskable tokens; 80% -> mask token, 10% -> random, 10% kept.
    With `word_ids` ([B, L], the tokenizer's word index of each token, -1 for none) whole words are
    picked with probability `prob`, every token of a picked word at once.

    Returns (input ids, labels) with labels = IGNORE_INDEX at positions not picked.
    """
    if word_ids is None:
        picked = (torch.rand(ids.shape, generator=generator) < prob) & maskable
    else:
        words = torch.rand(ids.shape[0], max(1, int(word_ids.max()) + 1), generator=generator) < prob
        picked = words.gather(1, word_ids.clamp(min=0)) & (word_ids >= 0) & maskable
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
    roll = torch.rand(ids.shape, generator=generator)
    out = ids.clone()
    out[picked & (roll < 0.8)] = mask_id
    swap = picked & (roll >= 0.8) & (roll < 0.9)
    out[swap] = torch.randint(vocab_size, ids.shape, generator=generator)[swap]
    return out, labels


def scl_text_mask(ids, maskable, mask_id: int, ratio: float, generator=None):
    """Replace round(ratio * n) of each row's maskable tokens (at least one) with the mask token."""
    out = ids.clone()
    for row in range(ids.shape[0]):
        pos = maskable[row].nonzero().squeeze(1)
        if len(pos) == 0:
            continue
        n = max(1, round(ratio * len(pos)))
        out[row, pos[torch.randperm(len(pos), generator=generator)[:n]]] = mask_id
    return out


def num_kept_patches(num_patches: int, ratio: float) -> int:
    return max(1, num_patches - math.floor(ratio * num_patches))


def patch_keep(batch: int, num_patches: int, ratio: float, generator=None):
    """Sorted indices [batch, n_keep] of the patches that stay visible (MAE-style random drop).

    One index set per sample, applied to every frame of a video (the same positions in all frames).
    """
    n_keep = num_kept_patches(num_patches, ratio)
    noise = torch.rand(batch, num_patches, generator=generator)
    return noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values


def make_masks(batch: dict, cfg, special_ids, mask_id: int, vocab_size: int, num_patches: int,
               generator=None, word_ids=None) -> dict:
    """Add `mlm_ids`, `mlm_labels`, `scl_ids` and `patch_keep` to a batch holding `text_ids`/`attention_mask`.
    `word_ids` (the tokenizer's, -1 for none): MLM masks whole words when `cfg.mlm_whole_word`."""
    ids, attn = batch["text_ids"], batch["attention_mask"].bool()
    maskable = attn & ~torch.isin(ids, torch.as_tensor(list(special_ids), dtype=ids.dtype))
    words = word_ids if cfg.mlm_whole_word else None
    batch["mlm_ids"], batch["mlm_labels"] = mlm_mask(ids, maskable, mask_id, vocab_size, cfg.mlm_prob, generator,
                                                     words)
    batch["scl_ids"] = scl_text_mask(ids, maskable, mask_id, cfg.scl_text_ratio, generator)
    batch["patch_keep"] = patch_keep(ids.shape[0], num_patches, cfg.scl_patch_ratio, generator)
    return batch
