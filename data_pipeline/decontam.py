"""Decontamination: n-gram overlap between training documents and evaluation sets.

Evaluation texts and documents are tokenised as MinHash sees them (:func:`data_pipeline.minhash.shingle_tokens`:
simplified text; whitespace words, every character of a spaceless script a token). Each evaluation text
contributes the hashes of its token n-grams, n = ``ngram`` (13, as GPT-3's overlap test) for text written
with spaces and n = ``char_ngram`` (20 characters) for spaceless text; a text shorter than its n but with
at least ``min_tokens`` tokens contributes itself whole (so short questions are found too). With t_i the
xxh64 of token i and odd constants C_k,

    g_i = fmix64( L  XOR  sum_{k<L} t_{i+k} * C_k  mod 2^64 ),     L the n-gram length,

and the index is the sorted set of all g (8 bytes per distinct n-gram; 64-bit hashes make a false match
between distinct n-grams ~N^2 / 2^64, negligible). ``matches(text)`` is the number of distinct n-grams of
``text``, at every indexed length, found in the index; a document is contaminated when
``matches >= min_matches``.

Evaluation files: JSONL (``.jsonl`` / ``.json``, optionally ``.gz`` or ``.zst``; the ``text_fields`` of each
record, strings or lists of strings) or plain text (any other suffix; one evaluation text per paragraph,
paragraphs separated by blank lines). Paths or URLs (:func:`data_pipeline.storage.open_file`).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Iterable, Iterator

import numpy as np

from data_pipeline import storage
from data_pipeline.config import DataConfigError, DecontamConfig
from data_pipeline.minhash import _fmix64, shingle_tokens, token_hashes

log = logging.getLogger(__name__)

_JSONL = (".jsonl", ".json", ".ndjson")


def _open_text(url: str) -> io.TextIOBase:
    raw = storage.open_file(url, "rb")
    name = str(url).lower()
    if name.endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw)
        name = name[:-3]
    elif name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(raw)
        name = name[:-4]
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def read_eval_texts(url: str, text_fields: Iterable[str] = ("text",)) -> Iterator[str]:
    """The evaluation texts of one file (see the module docstring for the formats)."""
    fields = tuple(text_fields)
    name = str(url).lower().removesuffix(".gz").removesuffix(".zst")
    with _open_text(url) as f:
        if name.endswith(_JSONL):
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataConfigError(
                        f"{url}:{lineno}: not valid JSON ({e.msg}); decontam files are "
                        f"JSONL (one object per line) or plain text (.txt)"
                    ) from e
                values = [rec.get(k) for k in fields] if isinstance(rec, dict) else []
                if not any(v for v in values):
                    raise DataConfigError(
                        f"{url}:{lineno}: none of the fields {list(fields)} is present; "
                        f"set decontam.text_fields to the field(s) holding the text"
                    )
                for v in values:
                    for item in v if isinstance(v, list) else [v]:
                        if isinstance(item, str) and item.strip():
                            yield item
        else:
            para: list[str] = []
            for line in f:
                if line.strip():
                    para.append(line.strip())
                elif para:
                    yield "\n".join(para)
                    para = []
            if para:
                yield "\n".join(para)


class Decontaminator:
    """Built once per worker from the evaluation texts; ``matches(text)`` counts overlapping n-grams."""

    def __init__(
        self, texts: Iterable[str], ngram: int = 13, char_ngram: int = 20, min_tokens: int = 8, seed: int = 13
    ):
        if min(ngram, char_ngram, min_tokens) < 1:
            raise ValueError("ngram, char_ngram and min_tokens must be >= 1")
        self.ngram, self.char_ngram, self.min_tokens = ngram, char_ngram, min_tokens
        rng = np.random.default_rng(seed)
        self._mult = rng.integers(0, 2**63, size=max(ngram, char_ngram), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        parts: list[np.ndarray] = []
        lengths: set[int] = set()
        self.texts = 0
        for text in texts:
            toks, spaceless = shingle_tokens(text)
            n = char_ngram if spaceless else ngram
            if len(toks) < min_tokens:
                continue
            k = min(n, len(toks))
            lengths.add(k)
            parts.append(self._hashes(token_hashes(toks), k))
            self.texts += 1
        self.lengths = tuple(sorted(lengths))
        self.index = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)

    @classmethod
    def from_files(cls, files: Iterable[str], text_fields: Iterable[str] = ("text",), **kwargs) -> Decontaminator:
        files = list(files)
        fields = tuple(text_fields)
        dc = cls((t for url in files for t in read_eval_texts(url, fields)), **kwargs)
        log.info(
            "decontam: %d evaluation texts from %d files, %d distinct n-grams (lengths %s)",
            dc.texts,
            len(files),
            len(dc.index),
            list(dc.lengths),
        )
        return dc

    @classmethod
    def from_config(cls, cfg: DecontamConfig) -> Decontaminator:
        return cls.from_files(
            cfg.files, cfg.text_fields, ngram=cfg.ngram, char_ngram=cfg.char_ngram, min_tokens=cfg.min_tokens
        )

    def _hashes(self, th: np.ndarray, n: int) -> np.ndarray:
        m = len(th) - n + 1
        acc = th[:m] * self._mult[0]
        with np.errstate(over="ignore"):
            for k in range(1, n):
                acc += th[k : k + m] * self._mult[k]
            return _fmix64(acc ^ np.uint64(n))

    def matches(self, text: str) -> int:
        """Number of distinct n-grams of ``text`` (at every indexed length) that occur in the evaluation texts."""
        if not len(self.index):
            return 0
        toks, _ = shingle_tokens(text)
        if not toks:
            return 0
        th = token_hashes(toks)
        found = 0
        for n in self.lengths:
            if n > len(th):
                break
            h = np.unique(self._hashes(th, n))
            pos = np.searchsorted(self.index, h)
            pos[pos == len(self.index)] = 0
            found += int(np.count_nonzero(self.index[pos] == h))
        return found
