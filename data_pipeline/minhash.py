"""MinHash signatures and LSH band keys (pure NumPy; no Ray here).

Text is simplified (NFKC, lower case, digit runs -> 0, punctuation and symbols -> space; letters, digits
and combining marks kept) and split into tokens t_1..t_N by :func:`data_pipeline.script.split_tokens`:
whitespace words, except that every character of a script written without spaces (Han, Kana, Thai, ...)
is a token by itself. A document whose tokens are mostly such characters is *spaceless* and gets
character n-grams (n = ``char_ngram``, default 5); any other document gets word n-grams (n = ``ngram``,
default 5). Each token is hashed with xxh64 (through a per-process token -> hash cache) and each token
n-gram becomes one 64-bit shingle

    x_i = fmix64( sum_{k<n} xxh64(t_{i+k}) * C_k  mod 2^64 ),

with odd constants C_k (one set for words, one for characters) and MurmurHash3's 64-bit finaliser fmix64.
A document with fewer than n tokens has one shingle made of all its tokens. The H = b * r MinHash
functions are multiply-shift hashes (Dietzfelbinger et al. 1997)

    h_j(x) = ((a_j * x + c_j) mod 2^64) >> 32,      a_j odd, (a_j, c_j) drawn from ``seed``,

and the signature is sig_j = min_i h_j(x_i) (uint32). For two documents with shingle-set Jaccard J,
P(sig_j equal) ~= J. LSH splits the signature into b bands of r rows; band t's key is
a 64-bit hash of (t, sig_{tr..tr+r-1}). Two documents collide in at least one band with probability
P(J) = 1 - (1 - J^r)^b (14 x 8: P(0.9) = 0.9999, P(0.8) = 0.924, P(0.5) = 0.053).

Why 5 characters for spaceless scripts (``DedupConfig.char_ngram``): it makes J mean the same edit density
in every script. Substituting 2% of the tokens at random gives J = 0.83 on Chinese and Japanese documents
with character 5-grams and J = 0.85 on English with word 5-grams (multilingual test corpus); character
3-grams would give 0.89 (near-duplicates found at heavier edits than in English) and 8-grams 0.74 (lighter).
A 5-character window spans 2-3 Chinese or Japanese words, specific enough that documents sharing no
passage share almost no shingle.
"""

from __future__ import annotations

import re
import sys
import unicodedata

import numpy as np
import xxhash

from data_pipeline.script import split_tokens

CHAR_NGRAM = 5  # default character n for spaceless scripts (see the module docstring)
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_CHUNK = 2048  # shingles per [H, chunk] product: 112 x 2048 x 8 B = 1.8 MB (L2)
_G = np.uint64(0x9E3779B97F4A7C15)
_M = np.uint64(0xD6E8FEB86659FD93)
_CACHE_LIMIT = 1 << 18  # token -> xxh64 entries kept per process (~40 MB at the limit)
_TOKEN_HASH: dict[str, int] = {}


class _SimplifyTable(dict):
    """``str.translate`` table, filled lazily per code point: decimal digits (category Nd) -> '0', letters,
    digits, whitespace and combining marks (categories M*: Devanagari vowel signs, Thai and Arabic vowel
    marks, which are not ``\\w`` in Python's ``re`` but belong to their words) kept, '_' and everything else
    (punctuation, symbols, controls) -> space. One C-level pass instead of two regex passes."""

    def __missing__(self, cp: int) -> int:
        ch = chr(cp)
        if ch.isdecimal():
            out = 0x30
        elif ch != "_" and (ch.isalnum() or ch.isspace() or unicodedata.category(ch)[0] == "M"):
            out = cp
        else:
            out = 0x20
        self[cp] = out
        return out


_TABLE = _SimplifyTable()
for _cp in range(128):
    _TABLE[_cp]  # ASCII entries first: str.translate's ASCII fast path then needs no lookup
_ZEROS = re.compile(r"0+")


def _simplified(text: str) -> str:
    """NFKC, lower case, punctuation -> space, digit runs -> '0'; whitespace left as is."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_TABLE)
    return _ZEROS.sub("0", text) if "0" in text else text


def simplify(text: str) -> str:
    """The text MinHash sees: NFKC, lower case, digit runs -> 0, punctuation removed, whitespace collapsed."""
    return " ".join(_simplified(text).split())


def shingle_tokens(text: str) -> tuple[list[str], bool]:
    """Tokens of the simplified text and whether the document is spaceless (character n-grams)."""
    return split_tokens(_simplified(text))


def token_hashes(toks: list[str]) -> np.ndarray:
    """uint64 xxh64 of every token; each distinct token is hashed once per process (bounded cache)."""
    cache = _TOKEN_HASH
    if len(cache) > _CACHE_LIMIT:
        cache.clear()
    for w in set(toks).difference(cache):
        cache[sys.intern(w) if len(w) < 16 else w] = xxhash.xxh64_intdigest(w.encode("utf-8", "surrogatepass"))
    return np.fromiter(map(cache.__getitem__, toks), dtype=np.uint64, count=len(toks))


def _fmix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(33))
    x = x * _C1
    x = x ^ (x >> np.uint64(33))
    x = x * _C2
    return x ^ (x >> np.uint64(33))


class MinHasher:
    """Signatures and band keys for one (ngram, bands, rows, seed, char_ngram) setting."""

    def __init__(self, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1, char_ngram: int = CHAR_NGRAM):
        if ngram < 1 or char_ngram < 1:
            raise ValueError(f"ngram ({ngram}) and char_ngram ({char_ngram}) must be >= 1")
        self.ngram, self.bands, self.rows, self.char_ngram = ngram, bands, rows, char_ngram
        rng = np.random.default_rng(seed)
        num = bands * rows
        self.a = rng.integers(0, 2**63, size=num, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.c = rng.integers(0, 2**63, size=num, dtype=np.uint64)
        self.k = rng.integers(0, 2**63, size=ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.k_char = rng.integers(0, 2**63, size=char_ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def shingles(self, text: str) -> np.ndarray:
        """Sorted unique uint64 shingles: word n-grams, or character n-grams for a spaceless document."""
        toks, spaceless = shingle_tokens(text)
        if not toks:
            return np.zeros(0, dtype=np.uint64)
        wh = token_hashes(toks)
        mult = self.k_char if spaceless else self.k
        n = min(len(mult), len(wh))
        m = len(wh) - n + 1
        acc = wh[:m] * mult[0]
        with np.errstate(over="ignore"):
            for k in range(1, n):
                acc += wh[k : k + m] * mult[k]
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
                    np.multiply(a, x[None, q : q + m], out=b)
                    np.add(b, c, out=b)
                    d0 = int(np.searchsorted(starts, q, side="right")) - 1  # document holding shingle q
                    d1 = int(np.searchsorted(starts, q + m, side="left"))  # first document after the chunk
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
            h = np.broadcast_to(
                _fmix64((np.arange(self.bands, dtype=np.uint64) + np.uint64(1)) * _G), (n, self.bands)
            ).copy()
            for i in range(self.rows):
                h = _fmix64(h * _M + rows[:, :, i] + np.uint64(1))
        return h


def content_key(text: str) -> int:
    """Exact-duplicate key: xxh3-64 of the (cleaned) text, viewed as a signed 64-bit int."""
    return int(np.uint64(xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))).view(np.int64))


def shingle_jaccard(a: str, b: str, ngram: int = 5, char_ngram: int = CHAR_NGRAM) -> float:
    """Exact Jaccard of the token n-gram sets :meth:`MinHasher.shingles` hashes (words, or characters for
    spaceless documents; a pair with one of each shares nothing)."""

    def grams(t: str) -> set[tuple[str, ...]]:
        toks, spaceless = shingle_tokens(t)
        k = min(char_ngram if spaceless else ngram, len(toks))
        return {(spaceless, *toks[i : i + k]) for i in range(len(toks) - k + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / max(1, len(ga | gb))


def word_ngram_jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard of the simplified word n-gram sets (the quantity MinHash estimates)."""

    def grams(t: str) -> set[tuple[str, ...]]:
        w = simplify(t).split(" ")
        k = min(n, len(w))
        return {tuple(w[i : i + k]) for i in range(len(w) - k + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / max(1, len(ga | gb))
