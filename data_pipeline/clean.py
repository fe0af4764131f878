"""Clean: Unicode normalisation, whitespace, and Gopher/FineWeb-style quality filters.

Normalisation: Unicode form (NFC by default), control and zero-width characters removed, ``\\r\\n``/``\\r``
to ``\\n``, runs of spaces/tabs to one space, lines stripped, at most one blank line in a row.

Filters (Rae et al. 2021, "Scaling Language Models", App. A; FineWeb repetition rules). With W the
whitespace words of a document, L its non-empty lines and c(x) the characters of x:

- ``too_short`` / ``too_long``: |W| outside [min_words, max_words]
- ``mean_word_length``: mean c(w) outside [min_mean_word_len, max_mean_word_len]
- ``symbol_ratio``: (#'#' + #'...' + #'…') / |W| > max_symbol_word_ratio
- ``bullet_lines``: fraction of L starting with a bullet > max_bullet_line_frac
- ``ellipsis_lines``: fraction of L ending with an ellipsis > max_ellipsis_line_frac
- ``alpha_words``: fraction of W containing a letter < min_alpha_word_frac
- ``stop_words``: |{w in W : w in {the, be, to, of, and, that, have, with}}| < min_stop_words
- ``dup_lines``: (|L| - |set(L)|) / |L| > max_dup_line_frac
- ``dup_line_chars``: c(repeated occurrences of lines) / c(L) > max_dup_line_char_frac
- ``top_{n}gram``: count(g*) * c(g*) / c(W) > max_top_ngram_char_frac[n], g* the most frequent word n-gram
- ``dup_{n}gram``: c(words covered by any n-gram occurring more than once) / c(W) > max_dup_ngram_char_frac[n]

The first failing filter (in this order) is the document's removal reason; the pipeline counts them.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

import numpy as np

from data_pipeline.config import CleanConfig

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200c\u200d\u2060\ufeff]")
_HSPACE = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_BLANKS = re.compile(r"\n{3,}")
_BULLETS = ("•", "-", "*", "‣", "◦", "●", "▪", "–")
_STOP = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
_MIX = np.uint64(0x9E3779B97F4A7C15)


def normalize(text: str, form: str = "NFC") -> str:
    if form and form.lower() != "none":
        text = unicodedata.normalize(form, text)
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """h_i = sum_k ids[i+k] * M^(k+1) mod 2^64: one uint64 per word n-gram starting at i."""
    m = len(ids) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    mult = np.uint64(1)
    with np.errstate(over="ignore"):
        for k in range(n):
            mult = mult * _MIX
            h = h + ids[k:k + m] * mult
    return h


def _repetition_reason(words: list[str], cfg: CleanConfig) -> str:
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab) + 1) for w in words), dtype=np.uint64, count=len(words))
    wlen = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    total = int(wlen.sum()) or 1
    csum = np.concatenate([[0], np.cumsum(wlen)])
    for n, limit in sorted(cfg.max_top_ngram_char_frac.items()):
        if limit is None or len(words) < n:
            continue
        h = _ngram_hashes(ids, n)
        _, first, counts = np.unique(h, return_index=True, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] > 1:
            start = int(first[top])
            chars = int(csum[start + n] - csum[start])
            if counts[top] * chars / total > limit:
                return f"top_{n}gram"
    for n, limit in sorted(cfg.max_dup_ngram_char_frac.items()):
        if limit is None or len(words) < n:
            continue
        h = _ngram_hashes(ids, n)
        _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
        starts = np.nonzero(counts[inverse] > 1)[0]
        if len(starts) == 0:
            continue
        cover = np.zeros(len(words) + 1, dtype=np.int64)
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + n, -1)
        covered = np.cumsum(cover)[:-1] > 0
        if int(wlen[covered].sum()) / total > limit:
            return f"dup_{n}gram"
    return ""


def quality_reason(text: str, cfg: CleanConfig) -> str:
    """Name of the first quality filter ``text`` fails, or "" when it passes them all."""
    words = text.split()
    nw = len(words)
    if cfg.min_words is not None and nw < cfg.min_words:
        return "too_short"
    if cfg.max_words is not None and nw > cfg.max_words:
        return "too_long"
    if nw == 0:
        return "too_short"
    mean_len = sum(len(w) for w in words) / nw
    if cfg.min_mean_word_len is not None and mean_len < cfg.min_mean_word_len:
        return "mean_word_length"
    if cfg.max_mean_word_len is not None and mean_len > cfg.max_mean_word_len:
        return "mean_word_length"
    if cfg.max_symbol_word_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / nw > cfg.max_symbol_word_ratio:
            return "symbol_ratio"
    lines = [line for line in text.split("\n") if line]
    nl = len(lines) or 1
    if (cfg.max_bullet_line_frac is not None
            and sum(line.startswith(_BULLETS) for line in lines) / nl > cfg.max_bullet_line_frac):
        return "bullet_lines"
    if (cfg.max_ellipsis_line_frac is not None
            and sum(line.endswith(("...", "…")) for line in lines) / nl > cfg.max_ellipsis_line_frac):
        return "ellipsis_lines"
    if (cfg.min_alpha_word_frac is not None
            and sum(any(ch.isalpha() for ch in w) for w in words) / nw < cfg.min_alpha_word_frac):
        return "alpha_words"
    if cfg.min_stop_words is not None:
        stops = sum(w.lower().strip(".,;:!?'\"()") in _STOP for w in words)
        if stops < cfg.min_stop_words:
            return "stop_words"
    if cfg.max_dup_line_frac is not None or cfg.max_dup_line_char_frac is not None:
        counts = Counter(lines)
        dup_lines = sum(c - 1 for c in counts.values())
        dup_chars = sum((c - 1) * len(line) for line, c in counts.items())
        if cfg.max_dup_line_frac is not None and dup_lines / nl > cfg.max_dup_line_frac:
            return "dup_lines"
        total_chars = sum(len(line) for line in lines) or 1
        if cfg.max_dup_line_char_frac is not None and dup_chars / total_chars > cfg.max_dup_line_char_frac:
            return "dup_line_chars"
    return _repetition_reason(words, cfg)


def clean_batch(batch: dict[str, np.ndarray], cfg: CleanConfig) -> dict[str, Any]:
    """Ray UDF: normalise and filter the documents of a batch.

    Rows that already carry a ``reason`` (quarantined at ingest) pass through. A removed document keeps its
    row with ``reason = "filter:<name>"`` and an emptied text, so that the stage can count removals.
    Adds ``nbytes``: UTF-8 size of the text as ingested.
    """
    texts = batch["text"]
    reasons = batch["reason"]
    out_text = np.empty(len(texts), dtype=object)
    out_reason = np.empty(len(texts), dtype=object)
    nbytes = np.zeros(len(texts), dtype=np.int64)
    for i, (t, r) in enumerate(zip(texts, reasons)):
        if r:
            out_text[i], out_reason[i] = t, r
            continue
        nbytes[i] = len(t.encode("utf-8", "surrogatepass"))
        if not cfg.enabled:
            out_text[i], out_reason[i] = t, ""
            continue
        text = normalize(t, cfg.unicode_form)
        reason = quality_reason(text, cfg)
        out_text[i] = "" if reason else text
        out_reason[i] = f"filter:{reason}" if reason else ""
    return {**batch, "text": out_text, "reason": out_reason, "nbytes": nbytes}
