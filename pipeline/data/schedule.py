"""Which source feeds each step of an epoch: the same answer on every rank and in every worker.

Every rank computes the schedule from (seed, epoch) alone, so at any step all ranks hold batches of
the same modality and shape (cross-rank all_gather needs it). A batch comes from one source.
"""
from __future__ import annotations

import hashlib
import random


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from ints/strings (Python's hash() of str differs between processes)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def split_quotas(total: int, weights: list[float]) -> list[int]:
    """`total` steps shared in proportion to `weights` (largest remainder, ties to the first source)."""
    exact = [total * w / sum(weights) for w in weights]
    quotas = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[:total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def interleave(quotas: list[int]) -> list[int]:
    """Spread each source's steps evenly over the epoch: at every step, take the source furthest
    behind its proportional share (smooth weighted round-robin); the counts are exact."""
    total, done, order = sum(quotas), [0] * len(quotas), []
    for step in range(total):
        lag = [(step + 1) * q / total - d if d < q else float("-inf") for q, d in zip(quotas, done)]
        i = max(range(len(quotas)), key=lambda j: (lag[j], -j))
        done[i] += 1
        order.append(i)
    return order


def epoch_schedule(mixing: str, sharding: str, steps: int, weights: list[float], source_steps: list[int],
                   seed: int, epoch: int) -> list[int]:
    """Source index for each of the epoch's `steps` steps.

    split: each source gets exactly its `source_steps` (one pass over its samples); "alternate"
    interleaves them, "sample" shuffles them. resample: "alternate" interleaves quotas in proportion
    to the weights; "sample" draws each step's source independently with probability ~ weight.
    """
    rng = random.Random(derive_seed("schedule", seed, epoch))
    if sharding == "split":
        order = interleave(source_steps)
        if mixing == "sample":
            rng.shuffle(order)
        return order
    if mixing == "sample":
        return rng.choices(range(len(weights)), weights=weights, k=steps)
    return interleave(split_quotas(steps, weights))
