"""A synthetic corpus with planted near-duplicates of known word-5-gram Jaccard, and its scoring.

Base documents are random words (lower-case letters, 5-9 characters, from a 50,000-word vocabulary), so
two bases share essentially no 5-gram. A variant of a base at target Jaccard J replaces k words at
positions at least n apart with fresh words; each replacement removes n shingles and adds n new ones, so
with S = N - n + 1 shingles J = (S - n k) / (S + n k), i.e. k = round(S (1 - J) / (n (1 + J))). The exact
Jaccard of every planted pair is measured afterwards and used for scoring (never the target).

Scoring a dedup result (the ``removed.jsonl`` rows ``{id, kept_id}``): a pair is *detected* when base and
variant end in the same cluster (same survivor). Recall is measured on pairs with J >= 0.9 and on exact
copies; the false-positive rate on pairs with J <= 0.5; ``lost_clusters`` counts clusters whose survivor
is not among the kept documents (must be 0).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from data_pipeline.minhash import word_ngram_jaccard


@dataclass
class PlantedPair:
    base: str
    variant: str
    target: float
    jaccard: float


def make_corpus(
    n_bases: int, targets: tuple[float, ...], seed: int, words: int = 200, ngram: int = 5
) -> tuple[list[dict[str, str]], list[PlantedPair]]:
    """``n_bases`` bases; base i gets one variant at target ``targets[i % len(targets)]`` (1.0 = exact copy)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase))
    lengths = rng.integers(5, 10, size=60_000)
    chars = letters[rng.integers(0, 26, size=(60_000, 9))]
    vocab = ["".join(row[:n]) for row, n in zip(chars, lengths)]
    common, fresh = vocab[:50_000], vocab[50_000:]
    docs: list[dict[str, str]] = []
    pairs: list[PlantedPair] = []
    f = 0
    for i in range(n_bases):
        n = int(rng.integers(words, 2 * words))
        base_words = [common[j] for j in rng.integers(0, len(common), size=n)]
        target = targets[i % len(targets)]
        s = n - ngram + 1
        k = round(s * (1 - target) / (ngram * (1 + target)))
        var_words = list(base_words)
        slots = np.arange(0, n, ngram)
        for p in np.sort(rng.choice(slots, size=min(k, len(slots)), replace=False)):
            var_words[p] = fresh[f % len(fresh)] + "x" * (f // len(fresh))
            f += 1
        bid, vid = f"b{i:06d}", f"v{i:06d}"
        base, variant = " ".join(base_words), " ".join(var_words)
        docs.append({"id": bid, "text": base})
        docs.append({"id": vid, "text": variant})
        pairs.append(PlantedPair(bid, vid, target, word_ngram_jaccard(base, variant, ngram)))
    order = rng.permutation(len(docs))
    return [docs[j] for j in order], pairs


def score(pairs: list[PlantedPair], removed: dict[str, str], all_ids: set[str]) -> dict[str, float]:
    """``removed``: id -> kept_id. Returns recall / false-positive figures per Jaccard band."""

    def survivor(doc_id: str) -> str:
        return removed.get(doc_id, doc_id)

    def rate(sel: list[PlantedPair]) -> float:
        if not sel:
            return float("nan")
        return sum(survivor(p.base) == survivor(p.variant) for p in sel) / len(sel)

    kept = all_ids - set(removed)
    lost = sum(1 for k in set(removed.values()) if k not in kept)
    exact = [p for p in pairs if p.jaccard >= 1.0]
    high = [p for p in pairs if 0.9 <= p.jaccard < 1.0]
    low = [p for p in pairs if p.jaccard <= 0.5]
    # ids are b<i>/v<i>: a removal whose survivor is not its planted partner merged unrelated documents
    spurious = sum(1 for d, k in removed.items() if d[1:] != k[1:])
    out = {
        "recall_exact": rate(exact),
        "recall_j_ge_0.9": rate(high),
        "recall_j_ge_0.9_or_exact": rate(exact + high),
        "false_positive_j_le_0.5": rate(low),
        "pairs_exact": len(exact),
        "pairs_j_ge_0.9": len(high),
        "pairs_j_le_0.5": len(low),
        "lost_clusters": lost,
        "spurious_merges": spurious,
        "removed": len(removed),
    }
    for lo, hi in ((0.0, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9)):
        sel = [p for p in pairs if lo < p.jaccard <= hi]
        if sel:
            out[f"detected_j_{lo:.1f}_{hi:.1f}"] = rate(sel)
    return out
