"""MinHash signatures and LSH band keys (pure NumPy; no Ray here).

Text is simplified (lower case, digits -> 0, punctuation removed, whitespace collapsed) and split into
words w_1..w_N. Each word is hashed with xxh64, and each word n-gram (default n = 5) becomes one 64-bit
shingle

    x_i = fmix64( sum_{k<n} xxh64(w_{i+k}) * C_k  mod 2^64 ),

with odd constants C_k and MurmurHash3's 64-bit finaliser fmix64. A document with fewer than n words has
one shingle made of all its words. The H = b * r MinHash functions are multiply-shift hashes
(Dietzfelbinger et al. 1997)

    h_j(x) = ((a_j * x + c_j) mod 2^64) >> 32,      a_j odd, (a_j, c_j) drawn from ``seed``,

and the signature is sig_j = min_i h_j(x_i) (uint32). For two documents with shingle-set Jaccard J,
P(sig_j equal) ~= J. LSH splits the signature into b bands of r rows; band t's key is
a 64-bit hash of (t, sig_{tr..tr+r-1}). Two documents collide in at least one band with probability
P(J) = 1 - (1 - J^r)^b (14 x 8: P(0.9) = 0.9999, P(0.8) = 0.924, P(0.5) = 0.053).
"""
from __future__ import annotations

import re
import unicodedata

import numpy as np
import xxhash

_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)
_DIGITS = re.compile(r"\d+")
_WS = re.compile(r"\s+")
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_CHUNK = 2048                 # shingles per [H, chunk] product: 112 x 2048 x 8 B = 1.8 MB (L2)
_G = np.uint64(0x9E3779B97F4A7C15)
_M = np.uint64(0xD6E8FEB86659FD93)


def simplify(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = _DIGITS.sub("0", _PUNCT.sub(" ", text))
    return _WS.sub(" ", text).strip()


def _fmix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(33))
    x = x * _C1
    x = x ^ (x >> np.uint64(33))
    x = x * _C2
    return x ^ (x >> np.uint64(33))


class MinHasher:
    """Signatures and band keys for one (ngram, bands, rows, seed) setting."""

    def __init__(self, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1):
        self.ngram, self.bands, self.rows = ngram, bands, rows
        rng = np.random.default_rng(seed)
        num = bands * rows
        self.a = rng.integers(0, 2**63, size=num, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.c = rng.integers(0, 2**63, size=num, dtype=np.uint64)
        self.k = rng.integers(0, 2**63, size=ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def shingles(self, text: str) -> np.ndarray:
        words = simplify(text).split(" ")
        if not words or words == [""]:
            return np.zeros(0, dtype=np.uint64)
        wh = np.fromiter((xxhash.xxh64_intdigest(w.encode("utf-8", "surrogatepass")) for w in words), dtype=np.uint64, count=len(words))
        n = min(self.ngram, len(wh))
        m = len(wh) - n + 1
        acc = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                acc += wh[k:k + m] * self.k[k]
            return np.unique(_fmix64(acc))

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """uint32 [bands * rows]; all 0xFFFFFFFF for an empty shingle set."""
        return self.signatures([np.asarray(shingles, dtype=np.uint64)])[0]

    def signatures(self, shingle_sets: list[np.ndarray]) -> np.ndarray:
        """uint32 [n, bands * rows]: the signatures of many documents at once (row i = ``signature(sets[i])``).

        The shingles of all documents are laid end to end and processed in chunks of ``_CHUNK`` shingles:
        per chunk one [H, chunk] product ``a_j * x + c_j`` (mod 2^64, in place), then a ``minimum.reduceat``
        over each document's segment of the chunk (a document longer than a chunk is combined across chunks).
        Since ``>> 32`` is monotone, ``min_i (y_i >> 32) = (min_i y_i) >> 32``: the shift is done once per
        document and hash, after the minimum. Empty sets give all 0xFFFFFFFF.
        """
        n, num = len(shingle_sets), len(self.a)
        lens = np.fromiter((len(s) for s in shingle_sets), dtype=np.int64, count=n)
        mins = np.full((n, num), np.iinfo(np.uint64).max, dtype=np.uint64)
        nonempty = np.flatnonzero(lens)
        if len(nonempty):
            x = np.concatenate([shingle_sets[i] for i in nonempty]).astype(np.uint64, copy=False)
            starts = np.zeros(len(nonempty), dtype=np.int64)
            np.cumsum(lens[nonempty][:-1], out=starts[1:])
            out = np.full((len(nonempty), num), np.iinfo(np.uint64).max, dtype=np.uint64)
            buf = np.empty((num, min(_CHUNK, len(x))), dtype=np.uint64)
            a, c = self.a[:, None], self.c[:, None]
            with np.errstate(over="ignore"):
                for q in range(0, len(x), _CHUNK):
                    m = min(_CHUNK, len(x) - q)
                    b = buf[:, :m]
                    np.multiply(a, x[None, q:q + m], out=b)
                    np.add(b, c, out=b)
                    d0 = int(np.searchsorted(starts, q, side="right")) - 1        # document holding shingle q
                    d1 = int(np.searchsorted(starts, q + m, side="left"))         # first document after the chunk
                    seg = np.maximum(starts[d0:d1] - q, 0)
                    seg[0] = 0
                    np.minimum(out[d0:d1], np.minimum.reduceat(b, seg, axis=1).T, out=out[d0:d1])
            mins[nonempty] = out
        return (mins >> np.uint64(32)).astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """int64 [bands]: the band keys of one signature (see :meth:`band_keys_batch`), viewed as signed."""
        return self.band_keys_batch(np.asarray(sig, dtype=np.uint32)[None, :])[0].view(np.int64)

    def band_keys_batch(self, sigs: np.ndarray) -> np.ndarray:
        """uint64 [n, bands]: band t's key of signature s is a 64-bit hash of (t, s_{tr}, ..., s_{tr+r-1}),

            h_0 = fmix64((t + 1) * G),    h_{i+1} = fmix64(h_i * M + s_{tr+i} + 1),

        vectorised over documents (G, M odd constants; fmix64 is a bijection, so two different bands' rows
        collide with probability ~2^-64).
        """
        sigs = np.asarray(sigs, dtype=np.uint32)
        n = len(sigs)
        rows = sigs.reshape(n, self.bands, self.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            h = np.broadcast_to(_fmix64((np.arange(self.bands, dtype=np.uint64) + np.uint64(1)) * _G),
                                (n, self.bands)).copy()
            for i in range(self.rows):
                h = _fmix64(h * _M + rows[:, :, i] + np.uint64(1))
        return h


def content_key(text: str) -> int:
    """Exact-duplicate key: xxh3-64 of the (cleaned) text, viewed as a signed 64-bit int."""
    return int(np.uint64(xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))).view(np.int64))


def word_ngram_jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard of the simplified word n-gram sets (the quantity MinHash estimates)."""
    def grams(t: str) -> set[tuple[str, ...]]:
        w = simplify(t).split(" ")
        k = min(n, len(w))
        return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / max(1, len(ga | gb))
