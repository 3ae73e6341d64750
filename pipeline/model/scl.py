"""The SCL model: encoders, co-attention fusion, heads, and one training step's losses.

A batch holds
    pixels [B, T, 3, H, W]          images are T=1, videos T frames; one encoder serves both
    text_ids, attention_mask [B, L] the intact caption
    mlm_ids, mlm_labels [B, L]      BERT-masked caption and its targets (-100 elsewhere)
    scl_ids [B, L]                  caption with `loss.scl_text_ratio` of its tokens masked
    patch_keep [B, K]               visible patches for masked vision (same in every frame)

Fused schedule (default): each unimodal encoding is computed once (intact / masked image; intact,
MLM and SCL text in one text-encoder call). The contrastive part comes first (ITC features, the two SCL fusion passes), then the
ITM and MLM fusion passes of the intact image run as one concatenated batch. The naive schedule
re-encodes for every objective (as the reference code does) and exists to check the fused one.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline import objectives as obj
from pipeline.model.fusion import CoAttentionFusion
from pipeline.model.heads import MLMHead, MVMDecoder, Pooler, ProjectionHead
from pipeline.model.text import TextEncoder
from pipeline.model.vision import FlexibleViT


def init_fusion_weights(module: nn.Module, width: int, std: float = 0.0) -> None:
    """Normal init at `std` (0: 1/sqrt(width)) for the new (non-pretrained) modules; LayerNorms at 1 / 0.

    The reference (METER/BERT) uses std 0.02, i.e. 1/sqrt(2500): at width 768 that keeps each
    attention and FFN branch a fraction of its post-norm residual, but at small widths it makes the
    branches ~1e-3 of the residual, so the cross-modal path starts dead and ITM sits at its prior
    (bench/RESULTS.md, "SCL ablation"). 1/sqrt(width) keeps every branch at the residual's scale at
    any width (0.036 at 768).
    """
    std = std or width ** -0.5
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if getattr(m, "padding_idx", None) is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SCLModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.loss_cfg = cfg.model, cfg.loss
        mc = cfg.model
        self.vision = FlexibleViT(mc.vision)
        self.text = TextEncoder(mc.text)
        d = mc.fusion.hidden
        self.fusion = CoAttentionFusion(self.text.width, self.vision.width, d, mc.fusion.layers,
                                        mc.fusion.heads, mc.fusion.mlp_ratio, mc.fusion.dropout)
        self.text_pooler, self.vision_pooler = Pooler(d), Pooler(d)
        self.itm_head = nn.Linear(2 * d, 2)
        self.mlm_head = MLMHead(d, mc.text.vocab_size)
        # The reference's ITC projection (Linear-LN-GELU-Linear) on the fusion's input projections of
        # the global tokens (so ITC trains those too), at the backbone rate.
        self.text_proj = ProjectionHead(d, mc.itc_dim)
        self.vision_proj = ProjectionHead(d, mc.itc_dim)
        new = [self.fusion, self.text_pooler, self.vision_pooler, self.itm_head, self.mlm_head]
        self.mvm_decoder = None
        if cfg.loss.mvm > 0:
            self.mvm_decoder = MVMDecoder(self.vision.width, mc.mvm_decoder_dim, max(1, mc.mvm_decoder_dim // 64),
                                          mc.vision.patch_size)
            new.append(self.mvm_decoder)
        for m in new:
            init_fusion_weights(m, d, mc.fusion.init_std)
        init_fusion_weights(self.text_proj, d, mc.fusion.init_std)
        init_fusion_weights(self.vision_proj, d, mc.fusion.init_std)
        # A tower trained from scratch gets the same rule: at std 0.02 (timm's and BERT's) a narrow
        # tower's CLS output is the same vector for every input (cosine 1.0000 across a batch at
        # width 64), so ITC starts on a plateau it may never leave (bench/RESULTS.md, tower init).
        if mc.scratch_init == "scaled":
            if mc.vision.pretrained == "none":
                init_fusion_weights(self.vision, self.vision.width, mc.fusion.init_std)
            if mc.text.pretrained == "none":
                init_fusion_weights(self.text, self.text.width, mc.fusion.init_std)
        # Shape [1], not 0-dim: DeepSpeed broadcasts parameters through a byte view that 0-dim tensors lack.
        self.itc_temp = nn.Parameter(torch.full((1,), mc.itc_temp_init))

    def set_grad_checkpointing(self, on: bool = True) -> None:
        """Recompute the towers' activations in backward (train.activation_checkpointing)."""
        self.vision.grad_checkpointing = on
        self.text.set_grad_checkpointing(on)

    # ---- encoders and fusion (also used by retrieval evaluation) ----
    def encode_vision(self, pixels, keep=None):
        return self.vision(pixels, keep)

    def encode_text(self, ids, attention_mask):
        return self.text(ids, attention_mask)

    def itc_features(self, vision_tokens=None, text_tokens=None):
        """Unimodal global features for ITC: the mean of the frame CLS tokens / the text CLS, through the
        fusion's input projection (the released code's cross_modal_*_transform), then the ITC head."""
        v = t = None
        if vision_tokens is not None:
            v = self.vision_proj(self.fusion.vision_in(vision_tokens[:, :, 0].mean(1)))
        if text_tokens is not None:
            t = self.text_proj(self.fusion.text_in(text_tokens[:, 0]))
        return v, t

    def temperature(self):
        return self.itc_temp.clamp(0.001, 0.5).squeeze(0)

    def fuse(self, text_tokens, text_mask, vision_tokens, vision_type=1):
        """Co-attention over a pair. Returns the fused token streams, the raw fused global tokens
        (`text_cls` [B, D], `frame_cls` [B, T, D]: what SCL completes) and the pooled features
        (`text_pooled`, `vision_pooled`: what ITM reads). `vision_type`: the vision tokens' token type
        (an int, or one per row; NLVR2 gives its second image type 2)."""
        b, t, n, c = vision_tokens.shape
        ft, fv = self.fusion(text_tokens, text_mask, vision_tokens.reshape(b, t * n, c), vision_type)
        frame_cls = fv.reshape(b, t, n, -1)[:, :, 0]
        return {"text": ft, "vision": fv, "text_cls": ft[:, 0], "frame_cls": frame_cls,
                "text_pooled": self.text_pooler(ft[:, 0]),
                "vision_pooled": self.vision_pooler(frame_cls.mean(1))}

    def itm_logits(self, fused):
        return self.itm_head(torch.cat([fused["text_pooled"], fused["vision_pooled"]], dim=-1))

    def _fuse_many(self, pairs):
        """Run several (text, mask, vision) fusion passes of equal shapes as one batch."""
        sizes = [p[0].shape[0] for p in pairs]
        out = self.fuse(*(torch.cat(parts) for parts in zip(*pairs)))
        return [dict(zip(out, vals)) for vals in zip(*(v.split(sizes) for v in out.values()))]

    # ---- losses ----
    def forward(self, batch, generator=None, features_only=False, cached=None):
        """The losses of one batch; `loss` is their weighted sum.

        Contrastive accumulation (pipeline/train/gradcache.py) runs each micro-batch twice:
        `features_only=True` returns `contrastive_features` and does no other work; `cached` (a
        `gradcache.Cached`) then stands in for the ITC and SCL losses with the surrogate that carries
        their gradient over the whole accumulated batch.
        """
        if generator is None and "itm_seed" in batch:  # the loader keys each step's random choices
            generator = torch.Generator(device=batch["pixels"].device).manual_seed(int(batch["itm_seed"]))
        if self.loss_cfg.schedule == "naive":
            if features_only or cached is not None:
                raise ValueError("contrastive accumulation needs loss.schedule=fused")
            return self._forward_naive(batch, generator)
        return self._forward_fused(batch, generator, features_only, cached)

    def _want(self, name):
        return getattr(self.loss_cfg, name) > 0

    def _itc_similarity(self, vf, tf):
        """[B, B] cosine similarity of the ITC features (no grad), for ITM negatives."""
        with torch.no_grad():
            return nn.functional.normalize(vf.float(), dim=-1) @ nn.functional.normalize(tf.float(), dim=-1).t()

    def _itm_negatives(self, sim, generator):
        return obj.sample_itm_negatives(sim, self.loss_cfg.itm_negatives, generator,
                                        temperature=self.temperature().detach())

    def _itm_pairs(self, feats, t, mask, v, generator):
        """The ITM fusion inputs and their 0/1 labels (`loss.itm_pairs`):
        triplet  every pair, its text with another image and its image with another text (1:2);
        swap     a random half of the pairs keep their image, the rest get another one (1:1, the
                 released code's; its other image is a random one, here one of the batch)."""
        neg_t, neg_v = self._itm_negatives(self._itc_similarity(feats["itc_vision"], feats["itc_text"]), generator)
        b = t.shape[0]
        if self.loss_cfg.itm_pairs == "triplet":
            labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(t.device)
            return [(t, mask, v), (t[neg_t], mask[neg_t], v), (t, mask, v[neg_v])], labels
        where = generator.device if generator is not None else t.device
        keep = torch.zeros(b, dtype=torch.long, device=t.device)
        keep[torch.randperm(b, generator=generator, device=where)[:b // 2].to(t.device)] = 1
        images = torch.where(keep.bool(), torch.arange(b, device=t.device), neg_v)
        return [(t, mask, v[images])], keep

    def _itm_loss(self, fused: list[dict], labels):
        return obj.itm_loss(torch.cat([self.itm_logits(f) for f in fused]), labels)

    def _mlm_loss(self, fused, labels):
        sel = labels != obj.IGNORE_INDEX
        return obj.mlm_loss(self.mlm_head(fused["text"][sel]), labels[sel])

    def _scl_features(self, masked_v, masked_t):
        """SCL (the paper's pairing): the masked modality's raw fused global token recovers the
        intact modality's from the *other* pass, where the intact modality met the masked partner.

            vision: masked image + intact text  ->  intact image + masked text  (per frame)
            text:   intact image + masked text  ->  masked image + intact text

        A target from a pass with the same intact partner would let the query copy that partner
        (the text alone would identify the image); here the partner is masked on the other side.
        Targets are detached (stop-gradient).
        """
        return {"scl_vision_q": masked_v["frame_cls"], "scl_vision_k": masked_t["frame_cls"].detach(),
                "scl_text_q": masked_t["text_cls"], "scl_text_k": masked_v["text_cls"].detach()}

    def _mvm_loss(self, pixels, v_masked, keep):
        grid = (pixels.shape[-2] // self.vision.patch_size, pixels.shape[-1] // self.vision.patch_size)
        pred = self.mvm_decoder(v_masked, keep, grid)
        target = obj.patchify(pixels, self.vision.patch_size)
        dropped = torch.ones(pred.shape[0], pred.shape[2], dtype=torch.bool, device=pred.device)
        dropped.scatter_(1, keep, False)
        # [B, N, T, P][dropped] -> the dropped patches of every frame
        return obj.mvm_loss(pred.transpose(1, 2)[dropped], target.transpose(1, 2)[dropped])

    def _total(self, losses):
        total = sum(getattr(self.loss_cfg, k) * losses[k] for k in obj.TERMS if k in losses)
        if "contrastive_surrogate" in losses:  # already weighted (gradcache)
            total = total + losses["contrastive_surrogate"]
        losses["loss"] = total
        losses["itc_temperature"] = self.temperature().detach()
        return losses

    def _want_scl(self):
        return self._want("scl_vision") or self._want("scl_text")

    def _encode_texts(self, batch):
        """The intact caption and, where a loss wants them, its SCL- and MLM-masked copies, in one
        text-encoder call: ZeRO-3 keeps the parameters of a module that runs several times per
        forward gathered until backward ends (bench/RESULTS.md, ZeRO-3 memory)."""
        keys = ["text_ids"] + ["scl_ids"] * self._want_scl() + ["mlm_ids"] * self._want("mlm")
        mask = batch["attention_mask"]
        out = self.encode_text(torch.cat([batch[k] for k in keys]), mask.repeat(len(keys), 1))
        return dict(zip(keys, out.split(mask.shape[0])))

    def contrastive_features(self, batch, v, texts):
        """Everything the ITC and SCL losses read (see `objectives.contrastive_terms`), computed
        before any other work of the step and always in this order, so that a second forward from
        the same RNG state reproduces it. `texts`: `_encode_texts`. Returns (features, masked
        vision tokens or None)."""
        mask, t = batch["attention_mask"], texts["text_ids"]
        feats = {"temperature": self.temperature()}
        if self._want("itc") or self._want("itm"):
            feats["itc_vision"], feats["itc_text"] = self.itc_features(v, t)
        v_m = None
        if self._want_scl():
            v_m = self.encode_vision(batch["pixels"], batch["patch_keep"])
            masked_v = self.fuse(t, mask, v_m)
            masked_t = self.fuse(texts["scl_ids"], mask, v)
            feats.update(self._scl_features(masked_v, masked_t))
        return feats, v_m

    def _forward_fused(self, batch, generator, features_only=False, cached=None):
        pixels, mask = batch["pixels"], batch["attention_mask"]
        v = self.encode_vision(pixels)
        texts = self._encode_texts(batch)
        t = texts["text_ids"]
        feats, v_m = self.contrastive_features(batch, v, texts)
        if features_only:
            return feats
        if cached is None:
            losses = obj.contrastive_terms([feats], self.loss_cfg, self.loss_cfg.scl_temperature)
        else:
            surrogate, drift = cached.surrogate(feats)
            losses = {"contrastive_surrogate": surrogate, "cache_drift": drift}

        # Every other fusion pass of the intact image runs as one concatenated batch.
        pairs, itm_labels = [], None
        if self._want("itm"):
            pairs, itm_labels = self._itm_pairs(feats, t, mask, v, generator)
        n_itm = len(pairs)
        if self._want("mlm"):
            pairs.append((texts["mlm_ids"], mask, v))
        fused = self._fuse_many(pairs) if pairs else []
        if self._want("itm"):
            losses["itm"] = self._itm_loss(fused[:n_itm], itm_labels)
        if self._want("mlm"):
            losses["mlm"] = self._mlm_loss(fused[n_itm], batch["mlm_labels"])
        if self._want("mvm"):
            v_m = v_m if v_m is not None else self.encode_vision(pixels, batch["patch_keep"])
            losses["mvm"] = self._mvm_loss(pixels, v_m, batch["patch_keep"])
        return self._total(losses)

    def _forward_naive(self, batch, generator):
        """One full forward per objective, re-encoding every time (the reference's schedule)."""
        pixels, mask = batch["pixels"], batch["attention_mask"]
        enc_v = lambda keep=None: self.encode_vision(pixels, keep)  # noqa: E731
        enc_t = lambda key="text_ids": self.encode_text(batch[key], mask)  # noqa: E731
        feats = {"temperature": self.temperature()}
        if self._want("itc") or self._want("itm"):
            feats["itc_vision"], feats["itc_text"] = self.itc_features(enc_v(), enc_t())
        if self._want_scl():
            feats.update(self._scl_features(self.fuse(enc_t(), mask, enc_v(batch["patch_keep"])),
                                            self.fuse(enc_t("scl_ids"), mask, enc_v())))
        losses = obj.contrastive_terms([feats], self.loss_cfg, self.loss_cfg.scl_temperature)
        if self._want("itm"):
            pairs, labels = self._itm_pairs(feats, enc_t(), mask, enc_v(), generator)
            losses["itm"] = self._itm_loss([self.fuse(*p) for p in pairs], labels)
        if self._want("mlm"):
            losses["mlm"] = self._mlm_loss(self.fuse(enc_t("mlm_ids"), mask, enc_v()), batch["mlm_labels"])
        if self._want("mvm"):
            keep = batch["patch_keep"]
            losses["mvm"] = self._mvm_loss(pixels, enc_v(keep), keep)
        return self._total(losses)
