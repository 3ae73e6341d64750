"""Zero-shot retrieval: R@1/5/10 both ways, ITC scoring with optional ITM re-ranking of the top k.

Re-ranking (`eval.rerank`): every query's ITC top k are re-scored, by default with the ITC logit
plus the ITM log-odds (ALBEF's ITC + ITM), or with the ITM log-odds alone (METER). Both figures
and the ITC-only one are reported; the printed line names the one it shows.

An eval set is a list of visual items (image or video), each with one or more captions. A text→image
hit is the caption's own item; an image→text hit is any of the item's captions. Work is spread over
ranks and gathered; every rank runs the same number of forward calls with the same shapes, so the
model may be ZeRO-3-partitioned.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import distributed
from pipeline.data.tokenizer import encode

log = logging.getLogger(__name__)
KS = (1, 5, 10)


# ---- metrics on score matrices ----
def recall_at_k(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, txt2img: torch.Tensor, ks=KS) -> dict:
    """Recall (percent) from [n_img, n_txt] and [n_txt, n_img] scores, higher = better."""
    txt2img = torch.as_tensor(txt2img)
    out = {}
    for k in ks:
        top_t = sim_i2t.topk(min(k, sim_i2t.shape[1]), dim=1).indices  # [n_img, k] texts
        hit_i2t = (txt2img[top_t] == torch.arange(sim_i2t.shape[0])[:, None]).any(1)
        top_i = sim_t2i.topk(min(k, sim_t2i.shape[1]), dim=1).indices  # [n_txt, k] images
        hit_t2i = (top_i == txt2img[:, None]).any(1)
        out[f"i2t_r{k}"] = 100.0 * hit_i2t.float().mean().item()
        out[f"t2i_r{k}"] = 100.0 * hit_t2i.float().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def chance_recall(txt2img, n_img: int, ks=KS) -> dict:
    """Expected recall (percent) of a uniformly random ranking, same keys as `recall_at_k`."""
    txt2img = torch.as_tensor(txt2img)
    n_txt = len(txt2img)
    per_img = torch.bincount(txt2img, minlength=n_img).tolist()
    out = {}
    for k in ks:
        k_t, k_i = min(k, n_txt), min(k, n_img)
        # An image misses when all k drawn texts come from the n_txt - c others.
        miss = [math.comb(n_txt - c, k_t) / math.comb(n_txt, k_t) for c in per_img]
        out[f"i2t_r{k}"] = 100.0 * (1 - sum(miss) / n_img)
        out[f"t2i_r{k}"] = 100.0 * k_i / n_img
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def rerank(sim: torch.Tensor, k: int, score_fn) -> torch.Tensor:
    """Re-score the top-k columns of each row with `score_fn(row, cols) -> [k]`; the top k stay above
    every other column and the rest keep their order, so only the order within the top k changes."""
    out = sim.clone()
    if k <= 0:
        return out
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices
    floor = sim.max() + 1.0
    for r in range(sim.shape[0]):
        s = score_fn(r, top[r]).float().cpu()
        out[r, top[r]] = floor + (s - s.min())
    return out


# ---- features ----
def _padded_chunks(n_items: int, batch: int):
    """This rank's item indices in chunks; every rank gets the same number of equally sized chunks
    (short ones are padded by repeating an index; callers drop the repeats)."""
    world, rank = distributed.world_size(), distributed.rank()
    mine = list(range(rank, n_items, world))
    per_rank = math.ceil(n_items / world)
    mine = mine + mine[-1:] * (per_rank - len(mine)) if mine else [0] * per_rank
    return [mine[i:i + batch] for i in range(0, per_rank, batch)]


def _gather_rows(local: dict[int, object]) -> dict[int, object]:
    if distributed.world_size() == 1:
        return local
    parts = [None] * distributed.world_size()
    dist.all_gather_object(parts, local)
    merged = {}
    for p in parts:
        merged.update(p)
    return merged


@torch.no_grad()
def extract_features(model, items, captions, tokenizer, cfg, device):
    """items: list of pixels [T,3,H,W]; captions: flat list of str. Returns everything gathered on all ranks."""
    bs = cfg.eval.batch_size
    vis, txt = {}, {}
    for chunk in _padded_chunks(len(items), bs):
        pixels = torch.stack([items[i] for i in chunk]).to(device)
        tokens = model.encode_vision(pixels)
        feat, _ = model.itc_features(tokens, None)
        for j, i in enumerate(chunk):
            vis[i] = (tokens[j].float().cpu(), F.normalize(feat[j].float(), dim=-1).cpu())
    text = encode(tokenizer, captions, cfg.model.text.max_len)
    ids, mask = text["text_ids"], text["attention_mask"]
    for chunk in _padded_chunks(len(captions), bs):
        tokens = model.encode_text(ids[chunk].to(device), mask[chunk].to(device))
        _, feat = model.itc_features(None, tokens)
        for j, i in enumerate(chunk):
            txt[i] = (tokens[j].float().cpu(), F.normalize(feat[j].float(), dim=-1).cpu())
    vis, txt = _gather_rows(vis), _gather_rows(txt)
    v_tok = torch.stack([vis[i][0] for i in range(len(items))])
    v_feat = torch.stack([vis[i][1] for i in range(len(items))])
    t_tok = torch.stack([txt[i][0] for i in range(len(captions))])
    t_feat = torch.stack([txt[i][1] for i in range(len(captions))])
    return v_tok, v_feat, t_tok, t_feat, mask


@torch.no_grad()
def itm_rerank(model, sim, k, query_tokens, cand_tokens, text_is_query, t_mask, device, batch: int,
               mode: str = "itc_itm"):
    """Re-score each query's top-k candidates: ITM log-odds (`mode="itm"`), the ITC logit (cosine /
    temperature) plus the ITM log-odds (`"itc_itm"`), or the ranking head of retrieval fine-tuning
    (`"rank"`, METER's). Queries split over ranks, rows gathered."""
    if k <= 0:
        return sim
    temp = float(model.temperature())
    dtype = next(model.parameters()).dtype
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices
    scores = {}
    for chunk in _padded_chunks(sim.shape[0], max(1, batch // top.shape[1])):
        q = torch.tensor(chunk).repeat_interleave(top.shape[1])
        c = top[chunk].flatten()
        t_idx, v_idx = (q, c) if text_is_query else (c, q)
        text = (query_tokens if text_is_query else cand_tokens)[t_idx]
        vision = (cand_tokens if text_is_query else query_tokens)[v_idx]
        fused = model.fuse(text.to(device, dtype), t_mask[t_idx].to(device), vision.to(device, dtype))
        if mode == "rank":
            s = model.rank_logits(fused).float().view(len(chunk), -1).cpu()
        else:
            logits = model.itm_logits(fused).float()
            s = (logits[:, 1] - logits[:, 0]).view(len(chunk), -1).cpu()
        if mode == "itc_itm":
            s = s + sim[torch.tensor(chunk)[:, None], top[chunk]] / temp
        for j, r in enumerate(chunk):
            scores[r] = s[j]
    scores = _gather_rows(scores)
    return rerank(sim, k, lambda r, cols: scores[r])


@torch.no_grad()
def evaluate_retrieval(model, samples, tokenizer, cfg, device=None, rerank_k=None) -> dict:
    """R@k both ways on (key, pixels, captions) samples: `itc_*` from ITC alone, and with k > 0
    `itc_itm_*` (ITC + ITM on the top k), `itm_*` (ITM alone on the top k) and, for a model with a
    ranking head (retrieval fine-tuning), `rank_*`."""
    device = device or next(model.parameters()).device
    rerank_k = cfg.eval.itm_rerank_k if rerank_k is None else rerank_k
    was_training = model.training
    model.eval()
    items, captions, txt2img = [], [], []
    for i, (_, pixels, caps) in enumerate(samples):
        items.append(pixels)
        captions += caps
        txt2img += [i] * len(caps)
    if len(items) < 2:
        raise ValueError(f"retrieval needs at least 2 items, got {len(items)}")
    dtype = next(model.parameters()).dtype
    items = [x.to(dtype) for x in items]
    v_tok, v_feat, t_tok, t_feat, t_mask = extract_features(model, items, captions, tokenizer, cfg, device)
    sim = v_feat @ t_feat.t()
    metrics = {"itc_" + k: v for k, v in recall_at_k(sim, sim.t(), txt2img).items()}
    if rerank_k > 0:
        modes = ("itc_itm", "itm") + (("rank",) if getattr(model, "rank_head", None) is not None else ())
        for mode in modes:
            i2t = itm_rerank(model, sim, rerank_k, v_tok, t_tok, False, t_mask, device, cfg.eval.batch_size, mode)
            t2i = itm_rerank(model, sim.t(), rerank_k, t_tok, v_tok, True, t_mask, device, cfg.eval.batch_size, mode)
            metrics.update({f"{mode}_{k}": v for k, v in recall_at_k(i2t, t2i, txt2img).items()})
        metrics["rerank"] = cfg.eval.rerank
    metrics.update({"chance_" + k: v for k, v in chance_recall(txt2img, len(items)).items()})
    metrics.update(n_items=len(items), n_captions=len(captions))
    # items left out of the score (unreadable media, duplicate keys): reported beside it, never hidden
    metrics.update({f"skipped/{k}": v for k, v in sorted((getattr(samples, "skipped", None) or {}).items())})
    model.train(was_training)
    return metrics


def load_eval_set(data: str, modality: str, cfg, folder: str | None = None, num_samples: int | None = None):
    """Eval shards (a brace pattern, as dataprep writes them) or an annotation file beside a media folder."""
    from pipeline.data import build_eval_samples
    from pipeline.data.annotations import ANNOTATION_SUFFIXES, AnnotationSamples

    if data.endswith(ANNOTATION_SUFFIXES):
        return AnnotationSamples(data, modality, cfg, folder, num_samples or cfg.eval.num_samples or None)
    return build_eval_samples(data, modality, cfg, num_samples)


def evaluate_during_training(model, cfg, step) -> dict:
    """The trainer's hook: evaluate `cfg.eval.data` and return scalars for TensorBoard."""
    from pipeline.data import load_tokenizer

    samples = load_eval_set(cfg.eval.data, cfg.eval.modality, cfg)
    metrics = evaluate_retrieval(model, samples, load_tokenizer(cfg.data.tokenizer), cfg)
    if distributed.is_main():
        log.info("step %d retrieval: %s", step, format_metrics(metrics))
    return {k: v for k, v in metrics.items() if not k.startswith("chance_") and not isinstance(v, str)}


def format_metrics(m: dict, scores: str | None = None) -> str:
    """One line of R@k beside chance, for `scores` (default: the configured re-ranking, else ITC)."""
    best = scores or (m["rerank"] if "rerank" in m else "itc")
    if f"{best}_r_mean" not in m:
        best = "itc"
    parts = [f"{d} R@{k} {m[f'{best}_{d}_r{k}']:.1f} (chance {m[f'chance_{d}_r{k}']:.1f})"
             for d in ("i2t", "t2i") for k in KS]
    skipped = ", ".join(f"{k.split('/', 1)[1]} {v}" for k, v in m.items() if k.startswith("skipped/"))
    return (f"[{best}] " + ", ".join(parts) + f"; mean {m[f'{best}_r_mean']:.1f} (chance {m['chance_r_mean']:.1f})"
            + (f"; skipped: {skipped}" if skipped else ""))
