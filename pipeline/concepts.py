"""Synthetic batches (random pixels and token ids, real masks) for benchmarks, smoke runs and tests."""
import torch

from pipeline.data import masking

SPECIAL_IDS = (0, 1, 2, 3, 4)  # <s> <pad> </s> <unk> <mask>
# base's geometry from random weights, one optimizer step per micro-batch: benchmarks of speed and
# memory need neither the hub's weights nor the paper's accumulation
RANDOM_BASE = ("model.vision.pretrained=none", "model.text.pretrained=none", "train.global_batch=0")
MASK_ID = 4


def synthetic_batch(cfg, batch_size=8, frames=1, text_len=16, seed=0, size=None):
    """A batch with the keys the model reads, masks drawn by pipeline.data.masking from `seed`."""
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


class ConceptTask:
    """A learnable image-text task for behaviour tests and ablations.

    A sample is `factors` attributes, each one of `values` (8^3 = 512 combinations by default).
    Attribute i paints its value's smooth colour pattern into region i of the image (top half,
    bottom-left, bottom-right); the caption names each attribute's value with its own word, in a
    random order, among filler words; the pixels also carry per-sample noise. Matching needs every
    attribute on both sides, a similar pair (a hard negative) differs in one attribute, and masked
    inputs must be completed from the other modality: ITC, ITM, MLM and both SCL directions learn.
    """

    def __init__(self, cfg, factors=3, values=8, seed=0, noise=0.4, text_len=12, n_fillers=24):
        g = torch.Generator().manual_seed(seed)
        self.cfg, self.factors, self.values, self.text_len, self.noise = cfg, factors, values, text_len, noise
        self.size = cfg.model.vision.image_size
        self.patterns = self._smooth(factors * values, g).view(factors, values, 3, self.size, self.size)
        half = self.size // 2
        self.regions = torch.zeros(factors, 1, self.size, self.size)
        spans = [(slice(0, half), slice(None)), (slice(half, None), slice(0, half)),
                 (slice(half, None), slice(half, None))]
        for i in range(factors):
            rows, cols = spans[i % len(spans)]
            self.regions[i, :, rows, cols] = 1.0
        n_special = len(SPECIAL_IDS)
        vocab = cfg.model.text.vocab_size
        words = n_special + torch.randperm(vocab - n_special, generator=g)[:factors * values + n_fillers]
        self.words = words[:factors * values].view(factors, values)
        self.fillers = words[factors * values:]

    def _smooth(self, n, g, grid=4):
        low = torch.randn(n, 3, grid, grid, generator=g)
        return torch.nn.functional.interpolate(low, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def sample_attributes(self, n, generator):
        return torch.randint(self.values, (n, self.factors), generator=generator)

    def render(self, attrs, generator, frames=1):
        """Pixels [B, frames, 3, H, W] for attributes [B, factors] (the same picture in every frame)."""
        pix = self.noise * torch.randn(len(attrs), 3, self.size, self.size, generator=generator)
        for i in range(self.factors):
            pix += self.regions[i] * self.patterns[i, attrs[:, i]]
        return pix[:, None].expand(-1, frames, -1, -1, -1).clone()

    def captions(self, attrs, generator):
        """Token ids [B, text_len]: <s>, the attribute words and fillers in a random order, </s>, <pad>."""
        n_fill = self.text_len - 3 - self.factors
        ids = torch.empty(len(attrs), self.text_len, dtype=torch.long)
        for i, a in enumerate(attrs):
            body = torch.cat([self.words[torch.arange(self.factors), a],
                              self.fillers[torch.randint(len(self.fillers), (n_fill,), generator=generator)]])
            body = body[torch.randperm(len(body), generator=generator)]
            ids[i] = torch.cat([torch.tensor([0]), body, torch.tensor([2, 1])])
        return ids

    def batch(self, batch_size, generator, attrs=None, frames=1):
        attrs = self.sample_attributes(batch_size, generator) if attrs is None else attrs
        ids = self.captions(attrs, generator)
        batch = {"pixels": self.render(attrs, generator, frames), "text_ids": ids,
                 "attention_mask": (ids != 1).long(), "attributes": attrs}
        n_patches = (self.size // self.cfg.model.vision.patch_size) ** 2
        return masking.make_masks(batch, self.cfg.loss, SPECIAL_IDS, MASK_ID, self.cfg.model.text.vocab_size,
                                  n_patches, generator=generator)


def train_concepts(cfg, steps: int, batch_size: int = 32, seed: int = 0, task_seed: int = 1234,
                   log_every: int = 0, init: dict | None = None):
    """Train `build_model(cfg)` on ConceptTask with the trainer's parameter groups, AdamW, LR
    schedule, clipping rule and accumulation (`train.grad_accum` micro-batches of `batch_size`,
    with `train.contrastive_accum`), in one process (no DeepSpeed). Returns (model, task, history),
    history a list of per-step {loss name: value}. `init`: a state dict to start from (a fresh optimizer)."""
    from pipeline.config import accumulation
    from pipeline.model import build_model
    from pipeline.train import engine, gradcache

    tc, accum = cfg.train, accumulation(cfg, 1)
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    if init is not None:
        model.load_state_dict(init)
    opt = torch.optim.AdamW(engine.param_groups(model, tc), betas=tc.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: engine.lr_factor(s, tc))
    task = ConceptTask(cfg, seed=task_seed)
    g = torch.Generator().manual_seed(seed + 1)
    forward = lambda batch, **kw: model(batch, generator=g, **kw)  # noqa: E731
    backward = lambda loss: (loss / accum).backward()  # noqa: E731  (as DeepSpeed scales it)
    history = []
    for step in range(steps):
        batches = [task.batch(batch_size, g) for _ in range(accum)]
        opt.zero_grad(set_to_none=True)
        if tc.contrastive_accum and accum > 1:
            losses = gradcache.accumulate(forward, backward, batches, cfg.loss).losses
        else:
            outs = []
            for batch in batches:
                outs.append(forward(batch))
                backward(outs[-1]["loss"])
            losses = {k: torch.stack([o[k].detach() for o in outs]).mean() for k in outs[0]}
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        history.append({k: float(v) for k, v in losses.items()})
        if log_every and (step + 1) % log_every == 0:
            print(step + 1, " ".join(f"{k} {v:.3f}" for k, v in history[-1].items()), flush=True)
    return model, task, history


def tail_mean(history, fraction: float = 0.1) -> dict:
    """Each loss averaged over the last `fraction` of the steps."""
    tail = history[-max(1, int(len(history) * fraction)):]
    return {k: sum(h[k] for h in tail) / len(tail) for k in tail[-1]}


@torch.no_grad()
def evaluate_concepts(model, task: ConceptTask, n: int = 128, seed: int = 10_000, k: int = 8) -> dict:
    """Held-out retrieval on `n` fresh samples (distinct attribute sets) and ITM accuracy.

    Returns mean R@1/5/10 (percent, both ways) by ITC and by ITC + ITM on the ITC top k, their
    chance level, and ITM accuracy on the positives and on random negatives.
    """
    from pipeline import zeroshot

    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    attrs = torch.unique(task.sample_attributes(4 * n, g), dim=0)
    attrs = attrs[torch.randperm(len(attrs), generator=g)[:n]]
    b = task.batch(len(attrs), g, attrs=attrs)
    v = model.encode_vision(b["pixels"])
    t = model.encode_text(b["text_ids"], b["attention_mask"])
    vf, tf = model.itc_features(v, t)
    sim = torch.nn.functional.normalize(vf, dim=-1) @ torch.nn.functional.normalize(tf, dim=-1).t()
    temp = float(model.temperature())

    def itm_logodds(ti, vi):
        logits = model.itm_logits(model.fuse(t[ti], b["attention_mask"][ti], v[vi]))
        return logits[:, 1] - logits[:, 0]

    i2t = zeroshot.rerank(sim, k, lambda r, cols: sim[r, cols] / temp + itm_logodds(cols, torch.full_like(cols, r)))
    t2i = zeroshot.rerank(sim.t(), k, lambda r, cols: sim[cols, r] / temp + itm_logodds(torch.full_like(cols, r), cols))
    ids = torch.arange(len(attrs))
    perm = torch.roll(ids, 1)
    pos, neg = itm_logodds(ids, ids), itm_logodds(ids, perm)
    out = {"itc_r_mean": zeroshot.recall_at_k(sim, sim.t(), ids)["r_mean"],
           "itc_itm_r_mean": zeroshot.recall_at_k(i2t, t2i, ids)["r_mean"],
           "chance_r_mean": zeroshot.chance_recall(ids, len(ids))["r_mean"],
           "itm_acc_pos": (pos > 0).float().mean().item(), "itm_acc_neg": (neg < 0).float().mean().item()}
    model.train(was)
    return out
