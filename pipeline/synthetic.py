"""Synthetic batches (random pixels and token ids, real masks) for benchmarks, smoke runs and tests."""
import torch

from pipeline import masking

SPECIAL_IDS = (0, 1, 2, 3, 4)  # <s> <pad> </s> <unk> <mask>
MASK_ID = 4


def synthetic_batch(cfg, batch_size=8, frames=1, text_len=16, seed=0, size=None):
    """A batch with the keys the model reads, masks drawn by pipeline.masking from `seed`."""
    g = torch.Generator().manual_seed(seed)
    size = size or cfg.model.vision.image_size
    vocab = cfg.model.text.vocab_size
    ids = torch.randint(len(SPECIAL_IDS), vocab, (batch_size, text_len), generator=g)
    mask = torch.ones(batch_size, text_len, dtype=torch.long)
    lengths = torch.randint(text_len // 2, text_len + 1, (batch_size,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        ids[i, n:], mask[i, n:] = 1, 0
        ids[i, n - 1] = 2
    ids[:, 0] = 0
    batch = {"pixels": torch.randn(batch_size, frames, 3, size, size, generator=g),
             "text_ids": ids, "attention_mask": mask}
    n_patches = (size // cfg.model.vision.patch_size) ** 2
    return masking.make_masks(batch, cfg.loss, SPECIAL_IDS, MASK_ID, vocab, n_patches, generator=g)
