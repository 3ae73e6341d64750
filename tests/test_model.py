"""The SCL model on the tiny config: shapes, the frame attention pattern, schedules, gradients, learning."""
import pytest
import torch

from pipeline.config import load_config
from pipeline.model import build_model
from pipeline.model.vision import FlexibleViT, frame_attention_mask
from pipeline.concepts import synthetic_batch


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


def _model(cfg, seed=0, **loss):
    torch.manual_seed(seed)
    for k, v in loss.items():
        setattr(cfg.loss, k, v)
    return build_model(cfg)


def test_images_and_videos_share_one_encoder(cfg):
    model = _model(cfg).eval()
    img = model.encode_vision(torch.randn(2, 1, 3, 32, 32))
    vid = model.encode_vision(torch.randn(2, 4, 3, 32, 32))
    assert img.shape == (2, 1, 17, 64) and vid.shape == (2, 4, 17, 64)
    # Another resolution goes through the resampled positional embedding, same weights.
    assert model.encode_vision(torch.randn(1, 2, 3, 48, 48)).shape == (1, 2, 37, 64)
    keep = torch.tensor([[0, 3, 5], [1, 2, 15]])
    assert model.encode_vision(torch.randn(2, 4, 3, 32, 32), keep).shape == (2, 4, 4, 64)


def test_frame_attention_mask_pattern():
    m = frame_attention_mask(3, 4)  # 3 frames of [CLS, p, p, p]
    cls_rows = [0, 4, 8]
    for i in range(12):
        for j in range(12):
            expect = i in cls_rows or i // 4 == j // 4
            assert bool(m[i, j]) == expect, (i, j)


@pytest.mark.parametrize("keep", [None, torch.tensor([[0, 2, 7, 9], [1, 4, 5, 15]])])
def test_factorized_attention_equals_dense_mask(cfg, keep):
    torch.manual_seed(0)
    vit = FlexibleViT(cfg.model.vision).eval()
    with torch.no_grad():
        vit.temporal_embed.normal_(std=0.1)
    x = torch.randn(2, 4, 3, 32, 32)
    fact = vit(x, keep)
    vit.cfg.attention = "dense"
    dense = vit(x, keep)
    vit.cfg.attention = "factorized"
    assert torch.allclose(fact, dense, atol=1e-5)


def test_patch_tokens_see_only_their_frame_and_cls_sees_all(cfg):
    torch.manual_seed(0)
    vcfg = load_config("tiny", ["model.vision.depth=1"]).model.vision
    vit = FlexibleViT(vcfg).eval()
    x = torch.randn(1, 3, 3, 32, 32)
    y = x.clone()
    y[:, 2] += 1.0  # change only frame 2
    a, b = vit(x), vit(y)
    assert torch.allclose(a[:, 0, 1:], b[:, 0, 1:], atol=1e-6)  # frame 0 patches: untouched
    assert not torch.allclose(a[:, 0, 0], b[:, 0, 0], atol=1e-4)  # frame 0 CLS: sees frame 2


def test_loss_dict_has_every_term(cfg):
    model = _model(cfg, mvm=1.0)
    out = model(synthetic_batch(cfg, frames=4))
    assert {"itc", "itm", "mlm", "scl_vision", "scl_text", "mvm", "loss"} <= set(out)
    weighted = sum(getattr(cfg.loss, k) * out[k] for k in ("itc", "itm", "mlm", "scl_vision", "scl_text", "mvm"))
    assert torch.allclose(out["loss"], weighted)
    cfg.loss.mvm = 0.0


@pytest.mark.parametrize("frames", [1, 4])
def test_scl_vision_term_has_gradient_for_images_and_videos(cfg, frames):
    model = _model(cfg, itc=0.0, itm=0.0, mlm=0.0, scl_text=0.0)
    try:
        out = model(synthetic_batch(cfg, frames=frames))
        assert set(out) == {"scl_vision", "loss", "itc_temperature"}
        out["loss"].backward()
        grads = [p.grad for p in model.vision.blocks.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
        # SCL reads the raw fused global tokens; the poolers belong to ITM alone.
        assert model.fusion.vision_layers[-1].mlp[2].weight.grad.abs().sum() > 0
        assert model.vision_pooler.dense.weight.grad is None
    finally:
        for k in ("itc", "itm", "mlm", "scl_text"):
            setattr(cfg.loss, k, load_config("tiny").loss.__dict__[k])


@pytest.mark.parametrize("frames,negatives,pairs", [(1, "random", "triplet"), (4, "hard", "triplet"),
                                                    (2, "random", "triplet"), (1, "random", "swap"), (4, "hard", "swap")])
def test_fused_and_naive_schedules_agree(cfg, frames, negatives, pairs):
    model = _model(cfg, mvm=0.5, itm_negatives=negatives, itm_pairs=pairs).eval()
    batch = synthetic_batch(cfg, frames=frames, seed=3)
    try:
        with torch.no_grad():
            fused = model(batch, generator=torch.Generator().manual_seed(7))
            model.loss_cfg.schedule = "naive"
            naive = model(batch, generator=torch.Generator().manual_seed(7))
    finally:
        model.loss_cfg.schedule, cfg.loss.mvm, cfg.loss.itm_negatives, cfg.loss.itm_pairs = "fused", 0.0, "random", "triplet"
    assert fused.keys() == naive.keys()
    for k in fused:
        assert torch.allclose(fused[k], naive[k], atol=1e-5), (k, fused[k], naive[k])


def test_a_few_steps_on_a_fixed_batch_drive_the_loss_down(cfg):
    model = _model(cfg).train()
    batch = synthetic_batch(cfg, frames=1, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_pretrained_vision_weights_load_from_a_local_file(cfg, tmp_path):
    import timm
    torch.manual_seed(1)
    full = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0, img_size=32,
                             patch_size=8, embed_dim=64, depth=3, num_heads=2)
    path = tmp_path / "vit.pth"
    torch.save(full.state_dict(), path)
    vcfg = load_config("tiny", [f"model.vision.pretrained={path}", "model.vision.depth=2", "model.vision.pretrained_depth=3",
                                "model.vision.image_size=48"]).model.vision
    vit = FlexibleViT(vcfg)
    assert len(vit.blocks) == 2
    assert torch.equal(vit.blocks[1].mlp.fc1.weight, full.blocks[1].mlp.fc1.weight)
    assert torch.equal(vit.cls_token, full.cls_token)
    assert vit.pos_embed.shape == (1, 1 + 36, 64)  # resampled 4x4 -> 6x6 grid while loading
    assert torch.allclose(vit.pos_embed[:, 0], full.pos_embed[:, 0])


def test_base_names_the_openai_quickgelu_clip_tower():
    """`pretrained: hub` on base loads OpenAI's CLIP ViT-B/16, whose MLPs use QuickGELU (the paper's
    tower), not timm's default tag for the architecture (a LAION CLIP fine-tuned on ImageNet)."""
    import timm
    from timm.layers.activations import QuickGELU
    from timm.models import get_pretrained_cfg

    base = load_config("base", ["model.vision.pretrained=hub"]).model.vision
    pcfg = get_pretrained_cfg(base.timm_name)
    assert pcfg.tag == "openai" and pcfg.hf_hub_id.endswith(".openai"), pcfg
    # The same architecture name at a small geometry (no download) has QuickGELU activations.
    small = load_config("base", ["model.vision.pretrained=none", "model.vision.width=64", "model.vision.heads=2",
                                 "model.vision.depth=1",
                                 "model.vision.image_size=32", "model.vision.patch_size=8"]).model.vision
    vit = FlexibleViT(small)
    assert isinstance(vit.blocks[0].mlp.act, QuickGELU)
    assert isinstance(timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=32, patch_size=8,
                                        embed_dim=64, depth=1, num_heads=2).blocks[0].mlp.act, torch.nn.GELU)


def test_swap_itm_keeps_half_the_pairs_and_fuses_one_row_per_pair():
    """The released pairing: half the pairs (a random half) keep their image, the rest get another one."""
    cfg = load_config("tiny", ["loss.itm_pairs=swap"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = synthetic_batch(cfg, batch_size=8, seed=1)
    v = model.encode_vision(batch["pixels"])
    t = model.encode_text(batch["text_ids"], batch["attention_mask"])
    feats = dict(zip(("itc_vision", "itc_text"), model.itc_features(v, t)))
    seen = set()
    for seed in range(5):
        pairs, labels = model._itm_pairs(feats, t, batch["attention_mask"], v, torch.Generator().manual_seed(seed))
        assert len(pairs) == 1 and pairs[0][2].shape == v.shape and labels.sum() == 4
        kept = labels.bool()
        assert torch.equal(pairs[0][2][kept], v[kept])  # a kept pair's own image
        assert all(not torch.equal(pairs[0][2][i], v[i]) for i in (~kept).nonzero().flatten())
        seen.add(tuple(labels.tolist()))
    assert len(seen) > 1  # which half is kept is drawn per step


def test_itc_reads_the_fusion_input_projections():
    """As the released code: the ITC heads read the cross-modal transforms of the tower CLS tokens,
    so ITC trains those projections too."""
    cfg = load_config("tiny", ["loss.itm=0", "loss.mlm=0", "loss.scl_vision=0", "loss.scl_text=0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = synthetic_batch(cfg, frames=4, seed=2)
    v = model.encode_vision(batch["pixels"])
    t = model.encode_text(batch["text_ids"], batch["attention_mask"])
    vf, tf = model.itc_features(v, t)
    assert torch.allclose(vf, model.vision_proj(model.fusion.vision_in(v[:, :, 0].mean(1))))
    assert torch.allclose(tf, model.text_proj(model.fusion.text_in(t[:, 0])))
    model(batch)["loss"].backward()
    assert model.fusion.vision_in.weight.grad.abs().sum() > 0 and model.fusion.text_in.weight.grad.abs().sum() > 0
