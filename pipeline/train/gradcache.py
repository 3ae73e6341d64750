"""Contrastive accumulation: ITC and SCL negatives across every micro-batch of an accumulated step.

Plain gradient accumulation (`train.grad_accum = A`) lets the contrastive losses see only the rows
of one micro-batch as negatives; the paper's batch of 4,096 is such an accumulation. With
`train.contrastive_accum` one optimizer step instead (the GradCache idea, here for SCL too):

  1. runs the contrastive part of the forward (`SCLModel.contrastive_features`: ITC features, SCL
     queries and targets, the ITC temperature) of each micro-batch without gradients, keeping the
     RNG state each one started from (dropout, drop-path);
  2. computes ITC and both SCL losses over all A micro-batches of all ranks, and their gradients
     with respect to those features;
  3. re-runs each micro-batch from its RNG state with gradients, and backpropagates
     A · <features, cached gradient> plus its own per-sample losses (ITM, MLM, MVM).

DeepSpeed divides each micro-batch's loss by A, so the step's gradient is the gradient of the
contrastive losses over the A-times larger batch plus the mean of the per-sample losses' gradients:
the gradient of one step on the whole batch. It costs one extra no-grad forward of the contrastive
part per micro-batch; activation memory stays that of one micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline import distributed
from pipeline import objectives as obj

_QUERIES = ("temperature", "itc_vision", "itc_text", "scl_vision_q", "scl_text_q")  # features with a gradient


@dataclass
class StepResult:
    losses: dict  # name -> detached scalar tensor (this rank), mean over the micro-batches; empty when dropped
    applied: bool  # False: a non-finite loss on some rank dropped the micro-batch (or the whole group)
    partial: int = 0  # micro-batches of a cached step whose per-sample losses were non-finite (see `accumulate`)


@dataclass
class Cached:
    """What the second pass of one micro-batch needs: its first-pass features (for the drift check),
    the gradient of the step's weighted contrastive loss with respect to them, and the scale A."""
    features: dict
    grads: dict
    scale: float

    def surrogate(self, feats: dict):
        """(scale · Σ <feature, cached gradient>, largest |feature - first-pass feature|).

        The surrogate's gradient is the cached gradient pushed through this forward. The drift is
        0 when the forward is replayed exactly (the same RNG state, deterministic kernels)."""
        total = sum((feats[k].float() * g).sum() for k, g in self.grads.items())
        with torch.no_grad():
            drift = max((feats[k].float() - self.features[k].float()).abs().max() for k in self.grads)
        return self.scale * total, drift


def forward_rng(device: torch.device):
    """The RNG state a forward draws dropout from (CPU, and the device's), to replay it exactly."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def replay_rng(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def feature_gradients(features: list[dict], loss_cfg):
    """The weighted contrastive loss over all micro-batches (all ranks) and its gradient with
    respect to each micro-batch's features (one shared temperature, its gradient on the first).

    Returns (unweighted terms, weighted total, per-micro-batch {name: gradient})."""
    tau = features[0]["temperature"].detach().float().requires_grad_()
    leaves = []
    for f in features:
        leaf = {k: v.detach().float().requires_grad_(k in _QUERIES) for k, v in f.items() if k != "temperature"}
        leaves.append({**leaf, "temperature": tau})
    with torch.enable_grad():
        terms = obj.contrastive_terms(leaves, loss_cfg, loss_cfg.scl_temperature)
        total = sum(getattr(loss_cfg, k) * v for k, v in terms.items())
        wanted = [(i, k) for i, leaf in enumerate(leaves) for k in leaf if k in _QUERIES and k != "temperature"]
        inputs = [leaves[i][k] for i, k in wanted] + [tau]
        grads = torch.autograd.grad(total, inputs, allow_unused=True)  # collective: every rank calls it
    per_micro = [{} for _ in features]
    for (i, k), g in zip(wanted, grads):
        if g is not None:
            per_micro[i][k] = g
    if grads[-1] is not None:  # the temperature is one parameter: its whole gradient goes in once
        per_micro[0]["temperature"] = grads[-1]
    return {k: v.detach() for k, v in terms.items()}, total.detach(), per_micro


def accumulate(forward, backward, batches: list[dict], loss_cfg) -> StepResult:
    """One optimizer step's micro-batches with contrastive negatives across all of them.

    `forward(batch, **kw)` is the model (or DeepSpeed engine) call; `backward(loss)` backpropagates
    one micro-batch's loss (DeepSpeed: `engine.backward` then `engine.step`, which divides by A);

    A non-finite contrastive loss drops the whole group before any backward (returns applied=False).
    A non-finite per-sample loss in the second pass can no longer drop its micro-batch (the others'
    cached gradients count on it): that micro-batch backpropagates its contrastive gradient alone and
    is counted in `partial`.
    """
    device = batches[0]["pixels"].device
    states, features = [], []
    with torch.no_grad():
        for batch in batches:
            states.append(forward_rng(device))
            features.append({k: v.detach() for k, v in forward(batch, features_only=True).items()})
    terms, total, grads = feature_gradients(features, loss_cfg)
    if distributed.any_rank(not torch.isfinite(total).item()):
        return StepResult({}, False)

    scale, partial, reports = float(len(batches)), 0, []
    for batch, state, feats, g in zip(batches, states, features, grads):
        replay_rng(state, device)
        out = forward(batch, cached=Cached(feats, g, scale))
        loss, own = out["loss"], {k: v.detach().float() for k, v in out.items() if k in obj.TERMS}
        if distributed.any_rank(not torch.isfinite(loss.detach()).all().item()):
            partial += 1
            loss, own = out["contrastive_surrogate"], {}
        backward(loss)
        reports.append({**own, **terms, "itc_temperature": out["itc_temperature"].detach().float(),
                        "cache_drift": out["cache_drift"].detach().float(),
                        "loss": total + sum(getattr(loss_cfg, k) * v for k, v in own.items())})
    names = dict.fromkeys(k for r in reports for k in r)  # a partial micro-batch reports no per-sample losses
    losses = {k: torch.stack([r[k] for r in reports if k in r]).mean() for k in names}
    losses["cache_drift"] = torch.stack([r["cache_drift"] for r in reports]).max()
    return StepResult(losses, True, partial)
