"""The exact deterministic mixture: which sample of which source sits at global position k.

Interleave. Weights w_i are quantised to integer counts c_i over a period P (largest remainder, sum c_i = P).
One period is a stride schedule: source i's j-th slot gets the time (j + 1/2) / c_i, and the P slots are
sorted by (time, i). Position k then maps to

    r = k mod P,  source i = pattern[r],  j = floor(k / P) * c_i + rank[r]

where rank[r] counts the earlier slots of the same source in the period. Every prefix of every period holds
each source within one sample of its share (stride scheduling), and each full period holds exactly c_i.
The map is O(1) per position, so a resumed loader needs only the number of samples consumed.

Order within a source. j -> epoch e = floor(j / n_i), offset o = j mod n_i. The n_i samples are cut into
shuffle blocks of B samples; the blocks are permuted, and the samples inside each block, by keyed Feistel
permutations (keys from (seed, source, epoch[, block])), so every epoch visits every sample once in a fresh
order and no permutation is ever materialised (the same code serves 10^3 and 10^10 samples).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def quantize_weights(weights: list[float], period: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if (w <= 0).any():
        raise ValueError(f"mixture weights must be > 0, got {weights}")
    w = w / w.sum()
    raw = w * period
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: period - counts.sum()]] += 1
    if (counts == 0).any():
        raise ValueError(f"a mixture weight is below 1/period (period {period}); raise loader.period")
    return counts


class Interleave:
    """Global position -> (source index, index within that source's stream)."""

    def __init__(self, weights: list[float], period: int):
        self.counts = quantize_weights(weights, period)
        self.period = int(period)
        times = np.concatenate([(np.arange(c) + 0.5) / c for c in self.counts])
        src = np.concatenate([np.full(c, i) for i, c in enumerate(self.counts)])
        order = np.lexsort((src, times))
        self.pattern = src[order].astype(np.int64)
        self.rank = np.zeros(period, dtype=np.int64)
        seen = np.zeros(len(self.counts), dtype=np.int64)
        for r, s in enumerate(self.pattern):
            self.rank[r] = seen[s]
            seen[s] += 1

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = np.asarray(positions, dtype=np.int64)
        r = positions % self.period
        src = self.pattern[r]
        return src, (positions // self.period) * self.counts[src] + self.rank[r]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 -> uint64)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def derive_key(*parts: int) -> int:
    h = hashlib.blake2b(json.dumps([int(p) for p in parts]).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def feistel_permute(x: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of [0, n) (balanced Feistel network on 2h bits, cycle-walking into [0, n))."""
    x = np.asarray(x, dtype=np.uint64)
    if n <= 1:
        return x.copy()
    bits = max(2, int(np.ceil(np.log2(n))))
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(derive_key(key, r)) for r in range(rounds)]

    def once(v: np.ndarray) -> np.ndarray:
        left, right = v >> half, v & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << half) | right

    out = once(x)
    bad = out >= np.uint64(n)
    while bad.any():
        out[bad] = once(out[bad])
        bad = out >= np.uint64(n)
    return out


def source_order(j: np.ndarray, n: int, block: int, seed: int, source: int) -> np.ndarray:
    """Sample index (in [0, n)) of the j-th draw from a source of n samples (epochs of fresh orders)."""
    if n <= 0:
        raise ValueError("a source with no samples cannot be drawn from")
    j = np.asarray(j, dtype=np.int64)
    epoch, off = j // n, j % n
    out = np.empty(len(j), dtype=np.int64)
    block = max(1, min(block, n))
    full = (n // block) * block
    for e in np.unique(epoch):
        sel = epoch == e
        o = off[sel]
        res = np.empty(len(o), dtype=np.int64)
        in_blocks = o < full
        if in_blocks.any():
            ob = o[in_blocks]
            q = feistel_permute(ob // block, n // block, derive_key(seed, source, e)).astype(np.int64)
            inner = np.empty(len(ob), dtype=np.int64)
            for b in np.unique(q):
                bs = q == b
                inner[bs] = feistel_permute(ob[bs] % block, block, derive_key(seed, source, e, b)).astype(np.int64)
            res[in_blocks] = q * block + inner
        if (~in_blocks).any():
            ot = o[~in_blocks] - full
            res[~in_blocks] = full + feistel_permute(ot, n - full, derive_key(seed, source, e, -1)).astype(np.int64)
        out[sel] = res
    return out
