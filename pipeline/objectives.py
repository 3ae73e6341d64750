"""Pre-training losses as pure functions of tensors (no model, no I/O), each testable on its formula.

    contrastive_loss  symmetric InfoNCE, both directions summed (ITC and SCL)
    contrastive_terms ITC and both SCL terms over the features of one or more micro-batches
    caption_ranking_itc  image-to-text InfoNCE over every caption of a batch (retrieval fine-tuning)
    ranking_loss      cross-entropy of each image's caption against its negative captions (irtr)
    itm_loss          binary image-text matching cross-entropy
    mlm_loss          masked language modeling cross-entropy on masked positions only
    mvm_loss          MAE-style regression of normalised pixels on dropped patches
    sample_itm_negatives  hard (ITC-similarity) or uniform negatives for ITM
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline import distributed

IGNORE_INDEX = -100


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature, gather: bool = False) -> torch.Tensor:
    """L(q,k) = -mean_i log softmax(q kᵀ/τ)_ii - mean_i log softmax(k qᵀ/τ)_ii.

    `q`, `k` are [B, D] and are L2-normalised over the last (feature) dimension; row i of q and
    row i of k are the positive pair, every other row a negative. With `gather=True` the negatives
    come from all ranks: each rank scores its own rows against the gathered columns, and the
    gradient flows back to the rank that owns each row.
    """
    q = F.normalize(q.float(), dim=-1)
    k = F.normalize(k.float(), dim=-1)
    offset = 0
    q_all, k_all = q, k
    if gather and distributed.world_size() > 1:
        q_all, k_all = distributed.gather_with_grad(q), distributed.gather_with_grad(k)
        offset = distributed.rank() * q.shape[0]
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return (F.cross_entropy(q @ k_all.t() / temperature, labels)
            + F.cross_entropy(k @ q_all.t() / temperature, labels))


TERMS = ("itc", "itm", "mlm", "scl_vision", "scl_text", "mvm")  # the weighted losses (LossConfig)
CONTRASTIVE = ("itc", "scl_vision", "scl_text")  # the terms whose negatives are other rows of the batch


def contrastive_terms(features: list[dict], weights, scl_temperature: float, gather: bool = True) -> dict:
    """ITC and SCL losses (unweighted) for every term of `CONTRASTIVE` with a weight > 0 in `weights`.

    `features` holds one dict per micro-batch (the model's `contrastive_features`): `itc_vision`,
    `itc_text` [B, D]; `scl_vision_q`, `scl_vision_k` [B, T, D] (masked image's fused frame CLS and
    its target); `scl_text_q`, `scl_text_k` [B, D]; `temperature` (ITC). The rows of all the
    micro-batches are negatives of each other (contrastive accumulation); one dict is one batch.
    SCL vision compares each frame with the same frame of the other rows, so micro-batches of
    another frame count (images beside videos) form their own group, weighted by its rows.
    """
    cat = lambda key: torch.cat([f[key] for f in features])  # noqa: E731
    out = {}
    if weights.itc > 0:
        out["itc"] = contrastive_loss(cat("itc_vision"), cat("itc_text"), features[0]["temperature"], gather)
    if weights.scl_vision > 0:
        groups: dict[int, list[dict]] = {}
        for f in features:
            groups.setdefault(f["scl_vision_q"].shape[1], []).append(f)
        total, rows = 0.0, 0
        for frames, group in groups.items():
            q, k = (torch.cat([f[key] for f in group]) for key in ("scl_vision_q", "scl_vision_k"))
            loss = sum(contrastive_loss(q[:, i], k[:, i], scl_temperature, gather) for i in range(frames)) / frames
            total, rows = total + loss * q.shape[0], rows + q.shape[0]
        out["scl_vision"] = total / rows
    if weights.scl_text > 0:
        out["scl_text"] = contrastive_loss(cat("scl_text_q"), cat("scl_text_k"), scl_temperature, gather)
    return out


def caption_ranking_itc(images: torch.Tensor, captions: torch.Tensor, per_image: int, temperature,
                        gather: bool = True) -> torch.Tensor:
    """Image-to-text InfoNCE over every caption of the batch (of all ranks with `gather`): `images`
    [B, D], `captions` [B * per_image, D] where image i's own caption is row i * per_image and the
    rows after it are its negative captions (METER / SCL retrieval fine-tuning's ITC)."""
    images = F.normalize(images.float(), dim=-1)
    captions = F.normalize(captions.float(), dim=-1)
    offset = 0
    if gather and distributed.world_size() > 1:
        captions = distributed.gather_with_grad(captions)
        offset = distributed.rank() * images.shape[0]
    labels = (torch.arange(images.shape[0], device=images.device) + offset) * per_image
    return F.cross_entropy(images @ captions.t() / temperature, labels)


def ranking_loss(scores: torch.Tensor) -> torch.Tensor:
    """[B, 1 + N] match scores, the true caption first: cross-entropy towards column 0 (METER's irtr)."""
    return F.cross_entropy(scores.float(), torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of [N, 2] match logits against 0/1 labels."""
    return F.cross_entropy(logits.float(), labels)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over positions whose label is not IGNORE_INDEX (zero if none is masked)."""
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, T, N, patch*patch*C] in row-major patch order (as the ViT embeds them)."""
    b, t, c, h, w = pixels.shape
    x = pixels.reshape(b, t, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 3, 5, 4, 6, 2).reshape(b, t, (h // patch) * (w // patch), patch * patch * c)


def mvm_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error against per-patch normalised pixels (MAE's norm_pix_loss).

    `pred` and `target` are [..., P] over the dropped patches only.
    """
    target = target.float()
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    return F.mse_loss(pred.float(), target)


@torch.no_grad()
def sample_itm_negatives(sim_i2t: torch.Tensor, mode: str = "hard", generator=None, temperature=1.0):
    """One negative text per image and one negative image per text.

    `sim_i2t` is the [B, B] ITC cosine similarity. "hard" samples j ≠ i with probability
    softmax(sim / temperature) (ALBEF, at the ITC temperature: at τ = 1 cosines in [-1, 1] give a
    nearly uniform draw); "random" samples j ≠ i uniformly. Returns (text_for_image, image_for_text).
    """
    b = sim_i2t.shape[0]
    if b < 2:
        raise ValueError("ITM negatives need a batch of at least 2 pairs")
    eye = torch.eye(b, dtype=torch.bool, device=sim_i2t.device)

    def draw(sim):
        if mode == "hard":
            w = torch.softmax(sim.float().masked_fill(eye, float("-inf")) / float(temperature), dim=1)
        else:
            w = torch.ones_like(sim, dtype=torch.float)
        w = w.masked_fill(eye, 0.0) + (~eye) * 1e-12  # never the positive; never an all-zero row
        return torch.multinomial(w, 1, generator=generator).squeeze(1)

    return draw(sim_i2t), draw(sim_i2t.t())
