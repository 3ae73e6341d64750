"""Each loss against its formula on small tensors, the gathered version across 2 real ranks, masking statistics."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train_fixtures import free_port

from pipeline.data import masking
from pipeline import objectives as obj


def test_contrastive_loss_matches_hand_computed_value():
    # Unit vectors (already normalised), so the similarity matrix is known exactly.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    tau = 0.5
    s = [[1.0, 0.0], [0.6, 0.8]]  # s[i][j] = q_i . k_j
    row = lambda i: -math.log(math.exp(s[i][i] / tau) / sum(math.exp(s[i][j] / tau) for j in range(2)))
    col = lambda j: -math.log(math.exp(s[j][j] / tau) / sum(math.exp(s[i][j] / tau) for i in range(2)))
    expected = (row(0) + row(1)) / 2 + (col(0) + col(1)) / 2
    assert obj.contrastive_loss(q, k, tau).item() == pytest.approx(expected, rel=1e-6)
    # Normalisation is over the feature dimension: scaling a row changes nothing.
    assert obj.contrastive_loss(q * 3, k * torch.tensor([[2.0], [5.0]]), tau).item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_image_features_keep_their_gradient():
    # The reference normalised image features over the frame axis, which for T=1 keeps only the sign
    # and kills the gradient. Normalising over features must give a non-zero gradient.
    q = torch.randn(4, 8, requires_grad=True)
    obj.contrastive_loss(q, torch.randn(4, 8), 0.03).backward()
    assert q.grad.abs().sum() > 0


def test_itm_mlm_mvm_losses_match_formulas():
    logits = torch.tensor([[2.0, 0.5], [0.1, 1.0]])
    labels = torch.tensor([0, 1])
    p = torch.softmax(logits, 1)
    assert obj.itm_loss(logits, labels).item() == pytest.approx(-(p[0, 0].log() + p[1, 1].log()).item() / 2, rel=1e-6)

    mlm_logits = torch.randn(2, 3, 5)
    mlm_labels = torch.full((2, 3), obj.IGNORE_INDEX)
    mlm_labels[0, 1], mlm_labels[1, 2] = 3, 4
    lp = mlm_logits.log_softmax(-1)
    assert obj.mlm_loss(mlm_logits, mlm_labels).item() == pytest.approx(-(lp[0, 1, 3] + lp[1, 2, 4]).item() / 2, rel=1e-5)
    assert obj.mlm_loss(mlm_logits, torch.full((2, 3), obj.IGNORE_INDEX)).item() == 0.0

    pred, target = torch.randn(6, 12), torch.rand(6, 12)
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert obj.mvm_loss(pred, target).item() == pytest.approx(((pred - norm) ** 2).mean().item(), rel=1e-5)


def test_patchify_matches_the_vit_patch_order():
    pixels = torch.arange(3 * 4 * 4, dtype=torch.float).reshape(1, 1, 3, 4, 4)
    patches = obj.patchify(pixels, 2)
    assert patches.shape == (1, 1, 4, 12)
    # Patch 1 is the top-right 2x2 block; channels last within a pixel.
    assert patches[0, 0, 1, :3].tolist() == pixels[0, 0, :, 0, 2].tolist()


def test_itm_negatives_never_pick_the_positive_and_hard_prefers_similar():
    g = torch.Generator().manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[0, 1] = 0.5  # image 0 is more similar to text 1 than to the others (a cosine)
    counts = torch.zeros(4)
    for _ in range(200):
        t_for_i, i_for_t = obj.sample_itm_negatives(sim, "hard", g, temperature=0.07)
        assert (t_for_i != torch.arange(4)).all() and (i_for_t != torch.arange(4)).all()
        counts[t_for_i[0]] += 1
    assert counts[1] > 190
    t_for_i, _ = obj.sample_itm_negatives(sim, "random", g)
    assert (t_for_i != torch.arange(4)).all()


def _clustered_similarity(b=32, clusters=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(b) % clusters
    centres = torch.nn.functional.normalize(torch.randn(clusters, 64, generator=g), dim=-1)
    img = torch.nn.functional.normalize(centres[label] + 0.3 * torch.randn(b, 64, generator=g) / 8, dim=-1)
    txt = torch.nn.functional.normalize(centres[label] + 0.3 * torch.randn(b, 64, generator=g) / 8, dim=-1)
    return img @ txt.t(), label


def test_hard_negatives_come_from_the_positives_cluster_at_the_model_temperature():
    sim, label = _clustered_similarity()
    g = torch.Generator().manual_seed(1)
    rates = {}
    for mode in ("hard", "random"):
        same = []
        for _ in range(50):
            t_for_i, i_for_t = obj.sample_itm_negatives(sim, mode, g, temperature=0.07)
            same += [(label[t_for_i] == label).float().mean(), (label[i_for_t] == label).float().mean()]
        rates[mode] = torch.stack(same).mean().item()
    uniform = (32 / 4 - 1) / 31  # the share of same-cluster candidates among the 31 others
    assert rates["hard"] >= 0.9, rates
    assert abs(rates["random"] - uniform) < 0.03, rates
    # At temperature 1 the same cosines give an almost uniform draw: why the temperature matters.
    same = [(label[obj.sample_itm_negatives(sim, "hard", g, temperature=1.0)[0]] == label).float().mean()
            for _ in range(50)]
    assert torch.stack(same).mean().item() < 0.5


def _gathered_worker(rank, port, q_full, k_full, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    n = q_full.shape[0] // 2
    q = q_full[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    k = k_full[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = obj.contrastive_loss(q, k, 0.1, gather=True)
    loss.backward()
    # DeepSpeed/DDP average gradients over ranks: mimic it.
    for g in (q.grad, k.grad):
        g /= 2
    out[rank] = (loss.detach(), q.grad, k.grad)
    dist.destroy_process_group()


def test_gathered_contrastive_loss_equals_the_full_batch_loss_and_gradient():
    torch.manual_seed(0)
    q_full, k_full = torch.randn(8, 16), torch.randn(8, 16)
    out = mp.Manager().dict()
    mp.spawn(_gathered_worker, args=(free_port(), q_full, k_full, out), nprocs=2)
    q_ref, k_ref = q_full.clone().requires_grad_(True), k_full.clone().requires_grad_(True)
    ref = obj.contrastive_loss(q_ref, k_ref, 0.1)
    ref.backward()
    # The mean over ranks of the per-rank loss is the full-batch loss.
    assert ((out[0][0] + out[1][0]) / 2).item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]), q_ref.grad, atol=1e-6)
    assert torch.allclose(torch.cat([out[0][2], out[1][2]]), k_ref.grad, atol=1e-6)


def test_mlm_mask_follows_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (400, 50), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False
    out, labels = masking.mlm_mask(ids, maskable, mask_id=4, vocab_size=1000, prob=0.15, generator=g)
    picked = labels != obj.IGNORE_INDEX
    assert not picked[:, 0].any()
    assert picked.float().sum() / maskable.sum() == pytest.approx(0.15, abs=0.01)
    assert (labels[picked] == ids[picked]).all()
    n = picked.sum().item()
    as_mask = (out[picked] == 4).sum().item() / n
    kept = (out[picked] == ids[picked]).sum().item() / n
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1, abs=0.02)  # (random tokens equal to the original are rare)
    assert 1 - as_mask - kept == pytest.approx(0.1, abs=0.02)
    assert (out[~picked] == ids[~picked]).all()


def test_scl_text_mask_and_patch_keep_ratios():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 100, (50, 20), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 15:] = False  # padding
    out = masking.scl_text_mask(ids, maskable, mask_id=4, ratio=0.4, generator=g)
    assert ((out == 4).sum(1) == 6).all()  # round(0.4 * 15)
    assert (out[:, 15:] == ids[:, 15:]).all()
    keep = masking.patch_keep(1000, 36, 0.8, generator=g)
    assert keep.shape == (1000, 8)  # 36 - floor(0.8 * 36)
    assert (keep.diff(dim=1) > 0).all()
    # Every patch is kept equally often: uniform MAE-style drop.
    freq = torch.bincount(keep.flatten(), minlength=36).float() / 1000
    assert freq.min() > 8 / 36 - 0.06 and freq.max() < 8 / 36 + 0.06


def test_make_masks_never_masks_special_or_padding():
    ids = torch.tensor([[0, 11, 12, 13, 14, 15, 2, 1, 1]])
    attn = (ids != 1).long()
    g = torch.Generator().manual_seed(0)
    from pipeline.config import LossConfig
    b = masking.make_masks({"text_ids": ids, "attention_mask": attn}, LossConfig(mlm_prob=0.99),
                           special_ids=(0, 1, 2, 3, 4), mask_id=4, vocab_size=50, num_patches=16, generator=g)
    for key in ("mlm_ids", "scl_ids"):
        assert (b[key][0, [0, 6, 7, 8]] == ids[0, [0, 6, 7, 8]]).all()
    assert (b["mlm_labels"][0, [0, 6, 7, 8]] == obj.IGNORE_INDEX).all()
    assert b["patch_keep"].shape == (1, 4)


def test_whole_word_masking_picks_every_token_of_a_word_together():
    """Words of 1-3 tokens (the tokenizer's word ids): a word is masked whole or not at all, and about
    `prob` of the words are picked."""
    torch.manual_seed(0)
    b, words_per_row = 64, 12
    word_ids = torch.full((b, 40), -1)
    ids = torch.full((b, 40), 1)
    for r in range(b):
        pos = 1
        for w in range(words_per_row):
            n = 1 + (w + r) % 3
            word_ids[r, pos:pos + n] = w
            ids[r, pos:pos + n] = torch.randint(10, 100, (n,))
            pos += n
    maskable = word_ids >= 0
    g = torch.Generator().manual_seed(1)
    _, labels = masking.mlm_mask(ids, maskable, 4, 100, 0.15, g, word_ids)
    IGNORE_INDEX = obj.IGNORE_INDEX
    picked = labels != IGNORE_INDEX
    words_picked = 0
    for r in range(b):
        for w in range(words_per_row):
            cells = picked[r][word_ids[r] == w]
            assert cells.all() or not cells.any(), (r, w)
            words_picked += int(cells.all())
    assert 0.10 < words_picked / (b * words_per_row) < 0.20
    assert not picked[~maskable].any()
