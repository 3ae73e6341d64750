"""The SCL model: encoders, co-attention fusion, heads, and one training step's losses.

A batch holds
    pixels [B, T, 3, H, W]          images are T=1, videos T frames; one encoder serves both
    text_ids, attention_mask [B, L] the intact caption
    mlm_ids, mlm_labels [B, L]      BERT-masked caption and its targets (-100 elsewhere)
    scl_ids [B, L]                  caption with `loss.scl_text_ratio` of its tokens masked
    patch_keep [B, K]               visible patches for masked vision (same in every frame)

Fused schedule (default): each unimodal encoding is computed once (intact / masked image, intact /
MLM / SCL text); every fusion pass that uses the intact image runs as one concatenated batch; the
clean pair's pass serves as the ITM positive and gives the SCL targets. The naive schedule re-encodes
for every objective (as the reference code does) and exists to check and measure the fused one.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline import objectives as obj
from pipeline.model.fusion import CoAttentionFusion
from pipeline.model.heads import MLMHead, MVMDecoder, Pooler
from pipeline.model.text import TextEncoder
from pipeline.model.vision import FlexibleViT


def _init_bert(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
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
        self.text_proj = nn.Linear(self.text.width, mc.itc_dim)
        self.vision_proj = nn.Linear(self.vision.width, mc.itc_dim)
        new = [self.fusion, self.text_pooler, self.vision_pooler, self.itm_head, self.mlm_head,
               self.text_proj, self.vision_proj]
        self.mvm_decoder = None
        if cfg.loss.mvm > 0:
            self.mvm_decoder = MVMDecoder(self.vision.width, mc.mvm_decoder_dim, max(1, mc.mvm_decoder_dim // 64),
                                          mc.vision.patch_size)
            new.append(self.mvm_decoder)
        for m in new:
            _init_bert(m)
        # Shape [1], not 0-dim: DeepSpeed broadcasts parameters through a byte view that 0-dim tensors lack.
        self.itc_temp = nn.Parameter(torch.full((1,), mc.itc_temp_init))

    # ---- encoders and fusion (also used by retrieval evaluation) ----
    def encode_vision(self, pixels, keep=None):
        return self.vision(pixels, keep)

    def encode_text(self, ids, attention_mask):
        return self.text(ids, attention_mask)

    def itc_features(self, vision_tokens=None, text_tokens=None):
        """Unimodal global features for ITC: mean of the frame CLS tokens / the text CLS, projected."""
        v = self.vision_proj(vision_tokens[:, :, 0].mean(1)) if vision_tokens is not None else None
        t = self.text_proj(text_tokens[:, 0]) if text_tokens is not None else None
        return v, t

    def temperature(self):
        return self.itc_temp.clamp(0.001, 0.5).squeeze(0)

    def fuse(self, text_tokens, text_mask, vision_tokens):
        """Co-attention over a pair. Returns fused token streams and pooled global features."""
        b, t, n, c = vision_tokens.shape
        ft, fv = self.fusion(text_tokens, text_mask, vision_tokens.reshape(b, t * n, c))
        frame_cls = fv.reshape(b, t, n, -1)[:, :, 0]
        return {"text": ft, "vision": fv,
                "text_global": self.text_pooler(ft[:, 0]),
                "vision_global": self.vision_pooler(frame_cls.mean(1))}

    def itm_logits(self, fused):
        return self.itm_head(torch.cat([fused["text_global"], fused["vision_global"]], dim=-1))

    def _fuse_many(self, pairs):
        """Run several (text, mask, vision) fusion passes of equal shapes as one batch."""
        sizes = [p[0].shape[0] for p in pairs]
        out = self.fuse(*(torch.cat(parts) for parts in zip(*pairs)))
        return [dict(zip(out, vals)) for vals in zip(*(v.split(sizes) for v in out.values()))]

    # ---- losses ----
    def forward(self, batch, generator=None):
        if self.loss_cfg.schedule == "naive":
            return self._forward_naive(batch, generator)
        return self._forward_fused(batch, generator)

    def _want(self, name):
        return getattr(self.loss_cfg, name) > 0

    def _itc(self, v_tok, t_tok, losses):
        vf, tf = self.itc_features(v_tok, t_tok)
        temp = self.temperature()
        losses["itc"] = obj.contrastive_loss(vf, tf, temp, gather=True)
        with torch.no_grad():
            return nn.functional.normalize(vf.float(), dim=-1) @ nn.functional.normalize(tf.float(), dim=-1).t()

    def _itm_loss(self, pos, neg_t, neg_v):
        logits = torch.cat([self.itm_logits(pos), self.itm_logits(neg_t), self.itm_logits(neg_v)])
        b = logits.shape[0] // 3
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        return obj.itm_loss(logits, labels)

    def _mlm_loss(self, fused, labels):
        sel = labels != obj.IGNORE_INDEX
        return obj.mlm_loss(self.mlm_head(fused["text"][sel]), labels[sel])

    def _scl(self, query, target):
        return obj.contrastive_loss(query, target.detach(), self.loss_cfg.scl_temperature, gather=True)

    def _mvm_loss(self, pixels, v_masked, keep):
        grid = (pixels.shape[-2] // self.vision.patch_size, pixels.shape[-1] // self.vision.patch_size)
        pred = self.mvm_decoder(v_masked, keep, grid)
        target = obj.patchify(pixels, self.vision.patch_size)
        dropped = torch.ones(pred.shape[0], pred.shape[2], dtype=torch.bool, device=pred.device)
        dropped.scatter_(1, keep, False)
        # [B, N, T, P][dropped] -> the dropped patches of every frame
        return obj.mvm_loss(pred.transpose(1, 2)[dropped], target.transpose(1, 2)[dropped])

    def _total(self, losses):
        losses["loss"] = sum(getattr(self.loss_cfg, k) * v for k, v in list(losses.items()))
        losses["itc_temperature"] = self.temperature().detach()
        return losses

    def _forward_fused(self, batch, generator):
        lc, pixels, mask = self.loss_cfg, batch["pixels"], batch["attention_mask"]
        need_clean = self._want("itm") or (lc.scl_target == "clean" and (self._want("scl_vision")
                                                                        or self._want("scl_text")))
        need_masked_v = self._want("scl_vision") or self._want("mvm") or (
            lc.scl_target == "cross" and self._want("scl_text"))
        need_scl_t = self._want("scl_text") or (lc.scl_target == "cross" and self._want("scl_vision"))
        v = self.encode_vision(pixels)
        t = self.encode_text(batch["text_ids"], mask)
        losses = {}
        sim = self._itc(v, t, losses) if self._want("itc") or self._want("itm") else None
        if not self._want("itc"):
            losses.pop("itc", None)

        pairs, names = [], []
        if need_clean:
            pairs.append((t, mask, v)), names.append("clean")
        if self._want("itm"):
            neg_t, neg_v = obj.sample_itm_negatives(sim, lc.itm_negatives, generator)
            pairs += [(t[neg_t], mask[neg_t], v), (t, mask, v[neg_v])]
            names += ["neg_t", "neg_v"]
        if self._want("mlm"):
            pairs.append((self.encode_text(batch["mlm_ids"], mask), mask, v)), names.append("mlm")
        if need_scl_t:
            pairs.append((self.encode_text(batch["scl_ids"], mask), mask, v)), names.append("scl_t")
        fused = dict(zip(names, self._fuse_many(pairs))) if pairs else {}
        if need_masked_v:
            v_m = self.encode_vision(pixels, batch["patch_keep"])
            fused["scl_v"] = self.fuse(t, mask, v_m)

        if self._want("itm"):
            losses["itm"] = self._itm_loss(fused["clean"], fused["neg_t"], fused["neg_v"])
        if self._want("mlm"):
            losses["mlm"] = self._mlm_loss(fused["mlm"], batch["mlm_labels"])
        src_v, src_t = ("clean", "clean") if lc.scl_target == "clean" else ("scl_t", "scl_v")
        if self._want("scl_vision"):
            losses["scl_vision"] = self._scl(fused["scl_v"]["vision_global"], fused[src_v]["vision_global"])
        if self._want("scl_text"):
            losses["scl_text"] = self._scl(fused["scl_t"]["text_global"], fused[src_t]["text_global"])
        if self._want("mvm"):
            losses["mvm"] = self._mvm_loss(pixels, v_m, batch["patch_keep"])
        return self._total(losses)

    def _forward_naive(self, batch, generator):
        """One full forward per objective, re-encoding every time (the reference's schedule)."""
        lc, pixels, mask = self.loss_cfg, batch["pixels"], batch["attention_mask"]
        enc_v = lambda keep=None: self.encode_vision(pixels, keep)
        enc_t = lambda key="text_ids": self.encode_text(batch[key], mask)
        losses = {}
        sim = self._itc(enc_v(), enc_t(), losses) if self._want("itc") or self._want("itm") else None
        if not self._want("itc"):
            losses.pop("itc", None)
        clean = lambda: self.fuse(enc_t(), mask, enc_v())
        if self._want("itm"):
            neg_t, neg_v = obj.sample_itm_negatives(sim, lc.itm_negatives, generator)
            t, v = enc_t(), enc_v()
            losses["itm"] = self._itm_loss(self.fuse(t, mask, v), self.fuse(t[neg_t], mask[neg_t], v),
                                           self.fuse(t, mask, v[neg_v]))
        if self._want("mlm"):
            losses["mlm"] = self._mlm_loss(self.fuse(enc_t("mlm_ids"), mask, enc_v()), batch["mlm_labels"])
        masked_v = lambda: self.fuse(enc_t(), mask, enc_v(batch["patch_keep"]))
        masked_t = lambda: self.fuse(enc_t("scl_ids"), mask, enc_v())
        if self._want("scl_vision"):
            target = clean() if lc.scl_target == "clean" else masked_t()
            losses["scl_vision"] = self._scl(masked_v()["vision_global"], target["vision_global"])
        if self._want("scl_text"):
            target = clean() if lc.scl_target == "clean" else masked_v()
            losses["scl_text"] = self._scl(masked_t()["text_global"], target["text_global"])
        if self._want("mvm"):
            keep = batch["patch_keep"]
            losses["mvm"] = self._mvm_loss(pixels, enc_v(keep), keep)
        return self._total(losses)
