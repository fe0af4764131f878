"""Clean: Unicode normalisation, language identification, and per-language quality filters.

Normalisation: Unicode form (NFC by default), control and zero-width characters removed, ``\\r\\n``/``\\r``
to ``\\n``, runs of spaces/tabs to one space, lines stripped, at most one blank line in a row.

Language: :func:`data_pipeline.langid.detect` on a bounded sample (``lang``; ``und`` when unsure). A source
that lists ``languages`` keeps only documents detected as one of them (reason ``language``).

Filters (Rae et al. 2021, "Scaling Language Models", App. A; FineWeb repetition rules). With W the
whitespace words of a document, L its non-empty lines and c(x) the characters of x, for documents written
with spaces between words:

- ``too_short`` / ``too_long``: |W| outside [min_words, max_words]
- ``mean_word_length``: mean c(w) outside [min_mean_word_len, max_mean_word_len]
- ``symbol_ratio``: (#'#' + #'...' + #'…') / |W| > max_symbol_word_ratio
- ``bullet_lines``: fraction of L starting with a bullet > max_bullet_line_frac
- ``ellipsis_lines``: fraction of L ending with an ellipsis > max_ellipsis_line_frac
- ``alpha_words``: fraction of W containing a letter < min_alpha_word_frac
- ``stop_words``: |{w in W : w in STOP[lang]}| < min_stop_words (languages without a list skip the rule)
- ``dup_lines``: (|L| - |set(L)|) / |L| > max_dup_line_frac
- ``dup_line_chars``: c(repeated occurrences of lines) / c(L) > max_dup_line_char_frac
- ``top_{n}gram``: count(g*) * c(g*) / c(W) > max_top_ngram_char_frac[n], g* the most frequent word n-gram
- ``dup_{n}gram``: c(words covered by any n-gram occurring more than once) / c(W) > max_dup_ngram_char_frac[n]

Documents in scripts written without spaces (zh, ja, th, ...; decided from the characters, see
:mod:`data_pipeline.script`) are measured in tokens T (every such character is a token, other runs are
words) and characters C (non-whitespace):

- ``too_short`` / ``too_long``: |C| outside [min_chars, max_chars]; no ``mean_word_length`` rule
- ``symbol_ratio``, ``alpha_words``: as above over T (tokens that are one punctuation mark are not counted
  by ``alpha_words``, as punctuation attached to a word is not)
- ``stop_words``: occurrences of the language's stop words (substrings: 的, 了, 是... or の, に, は...) < min_stop_words
- ``bullet_lines``, ``ellipsis_lines``, ``dup_lines``, ``dup_line_chars``: as above
- ``top_char_{n}gram`` / ``dup_char_{n}gram``: the n-gram rules over T with max_top_char_ngram_frac and
  max_dup_char_ngram_frac (a Chinese word is ~1.5-2 characters, so character n-grams of twice the word n)

``clean.by_language`` overrides any threshold for one language (defaults: Korean's and Vietnamese's short
space-separated words, Dravidian languages' long ones). The first failing filter (in this order) is the
document's removal reason; the pipeline counts them.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

import numpy as np

from data_pipeline import langid
from data_pipeline.config import CleanConfig
from data_pipeline.script import split_tokens

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200c\u200d\u2060\ufeff]")
_HSPACE = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_BLANKS = re.compile(r"\n{3,}")
_BULLETS = ("•", "-", "*", "‣", "◦", "●", "▪", "–")
_STRIP = ".,;:!?'\"()«»„“”‘’¿¡…[]{}<>-–—،؛؟"
_MIX = np.uint64(0x9E3779B97F4A7C15)

# Small lists of the most frequent function words. English is Gopher's list; the others are written for
# this module. zh/ja entries are characters/particles counted as substrings (no spaces to split on).
STOP_WORDS: dict[str, frozenset[str]] = {
    k: frozenset(v.split())
    for k, v in {
        "en": "the be to of and that have with",
        "de": "der die das und ist nicht ein eine zu den mit von sich auf für dem im",
        "fr": "le la les de des et est un une que qui dans pour en du au pas",
        "es": "el la los las de del y que en un una es por con para se",
        "it": "il lo la gli le di che e è un una per con non del della",
        "pt": "o a os as de do da que e em um uma para com não",
        "nl": "de het een en van is dat op te in met voor niet zijn",
        "ru": "и в не на что с по он я как это а но к из",
        "uk": "і в не на що з по він я як це а але до та",
        "pl": "i w nie na się z że do to jest jak o",
        "sv": "och i att det som en på är av för med",
        "tr": "ve bir bu da de için ile çok ne gibi",
        "id": "yang dan di ini itu dengan untuk dari dalam tidak",
        "ar": "في من على إلى أن عن التي الذي ما لا هذا مع كان",
        "zh": "的 了 是 在 和 有 我 不 这 也 就 都 人 他",
        "ja": "の に は を た が で て と し な",
    }.items()
}
_SUBSTRING_STOPS = frozenset(("zh", "ja"))


@dataclass
class CleanResult:
    """One document after :func:`clean_document`."""

    text: str  # normalised text (the input as is when ``clean.enabled`` is false)
    reason: str  # "" when kept, else the removing filter's name ("language", "too_short", ...)
    lang: str  # ISO 639-1 code ("und" when unsure; "" when ``clean.langid`` is false)
    lang_score: float = 0.0  # langid confidence of ``lang``


def normalize(text: str, form: str = "NFC") -> str:
    if form and form.lower() != "none":
        text = unicodedata.normalize(form, text)
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """h_i = sum_k ids[i+k] * M^(k+1) mod 2^64: one uint64 per token n-gram starting at i."""
    m = len(ids) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    mult = np.uint64(1)
    with np.errstate(over="ignore"):
        for k in range(n):
            mult = mult * _MIX
            h = h + ids[k : k + m] * mult
    return h


def _repetition_reason(
    words: list[str], top_limits: dict[int, float], dup_limits: dict[int, float], unit: str = ""
) -> str:
    """``top_{unit}{n}gram`` / ``dup_{unit}{n}gram`` for the first n-gram repetition limit exceeded."""
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab) + 1) for w in words), dtype=np.uint64, count=len(words))
    wlen = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    total = int(wlen.sum()) or 1
    csum = np.concatenate([[0], np.cumsum(wlen)])
    for n, limit in sorted(top_limits.items()):
        if limit is None or len(words) < n:
            continue
        h = _ngram_hashes(ids, n)
        _, first, counts = np.unique(h, return_index=True, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] > 1:
            start = int(first[top])
            chars = int(csum[start + n] - csum[start])
            if counts[top] * chars / total > limit:
                return f"top_{unit}{n}gram"
    for n, limit in sorted(dup_limits.items()):
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
            return f"dup_{unit}{n}gram"
    return ""


def stop_words(lang: str, cfg: CleanConfig) -> frozenset[str] | None:
    """The stop-word list of ``lang`` (``clean.stop_words`` replaces the built-in one); None = no list."""
    if lang in cfg.stop_words:
        return frozenset(cfg.stop_words[lang])
    return STOP_WORDS.get(lang)


def rules_for(cfg: CleanConfig, lang: str) -> CleanConfig:
    """``cfg`` with ``cfg.by_language[lang]``'s thresholds applied."""
    over = cfg.by_language.get(lang)
    return dataclasses.replace(cfg, **over) if over else cfg


def _line_reasons(lines: list[str], cfg: CleanConfig, start: bool) -> str:
    """``start``: the bullet and ellipsis line rules; else the duplicate line rules."""
    nl = len(lines) or 1
    if start:
        if (
            cfg.max_bullet_line_frac is not None
            and sum(line.startswith(_BULLETS) for line in lines) / nl > cfg.max_bullet_line_frac
        ):
            return "bullet_lines"
        if (
            cfg.max_ellipsis_line_frac is not None
            and sum(line.endswith(("...", "…")) for line in lines) / nl > cfg.max_ellipsis_line_frac
        ):
            return "ellipsis_lines"
        return ""
    if cfg.max_dup_line_frac is not None or cfg.max_dup_line_char_frac is not None:
        counts = Counter(lines)
        dup_lines = sum(c - 1 for c in counts.values())
        dup_chars = sum((c - 1) * len(line) for line, c in counts.items())
        if cfg.max_dup_line_frac is not None and dup_lines / nl > cfg.max_dup_line_frac:
            return "dup_lines"
        total_chars = sum(len(line) for line in lines) or 1
        if cfg.max_dup_line_char_frac is not None and dup_chars / total_chars > cfg.max_dup_line_char_frac:
            return "dup_line_chars"
    return ""


def _symbol_reason(text: str, n: int, cfg: CleanConfig) -> str:
    if cfg.max_symbol_word_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > cfg.max_symbol_word_ratio:
            return "symbol_ratio"
    return ""


def _word_reason(text: str, cfg: CleanConfig, lang: str) -> str:
    """The Gopher/FineWeb rules over whitespace words."""
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
    lines = [line for line in text.split("\n") if line]
    reason = _symbol_reason(text, nw, cfg) or _line_reasons(lines, cfg, start=True)
    if reason:
        return reason
    if (
        cfg.min_alpha_word_frac is not None
        and sum(any(ch.isalpha() for ch in w) for w in words) / nw < cfg.min_alpha_word_frac
    ):
        return "alpha_words"
    stops = stop_words(lang, cfg)
    if cfg.min_stop_words is not None and stops:
        if sum(w.lower().strip(_STRIP) in stops for w in words) < cfg.min_stop_words:
            return "stop_words"
    return _line_reasons(lines, cfg, start=False) or _repetition_reason(
        words, cfg.max_top_ngram_char_frac, cfg.max_dup_ngram_char_frac
    )


def _spaceless_reason(text: str, toks: list[str], cfg: CleanConfig, lang: str) -> str:
    """The rules for scripts without spaces: characters for length, tokens (characters) for the rest."""
    nc = len("".join(text.split()))
    if cfg.min_chars is not None and nc < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and nc > cfg.max_chars:
        return "too_long"
    lines = [line for line in text.split("\n") if line]
    reason = _symbol_reason(text, len(toks), cfg) or _line_reasons(lines, cfg, start=True)
    if reason:
        return reason
    if cfg.min_alpha_word_frac is not None:
        counted = [t for t in toks if not (len(t) == 1 and unicodedata.category(t)[0] == "P")]
        if sum(any(ch.isalpha() for ch in t) for t in counted) / (len(counted) or 1) < cfg.min_alpha_word_frac:
            return "alpha_words"
    stops = stop_words(lang, cfg)
    if cfg.min_stop_words is not None and stops:
        if lang in _SUBSTRING_STOPS:
            found = sum(text.count(s) for s in stops)
        else:
            found = sum(t.lower().strip(_STRIP) in stops for t in toks)
        if found < cfg.min_stop_words:
            return "stop_words"
    return _line_reasons(lines, cfg, start=False) or _repetition_reason(
        toks, cfg.max_top_char_ngram_frac, cfg.max_dup_char_ngram_frac, unit="char_"
    )


def quality_reason(text: str, cfg: CleanConfig, lang: str = "en") -> str:
    """Name of the first quality filter ``text`` (normalised) fails, or "" when it passes them all.

    ``lang`` picks the stop words and the ``by_language`` thresholds; the script (words or characters)
    is decided from the text itself (:func:`data_pipeline.script.split_tokens`)."""
    cfg = rules_for(cfg, lang)
    toks, spaceless = split_tokens(text)
    if spaceless:
        return _spaceless_reason(text, toks, cfg, lang)
    return _word_reason(text, cfg, lang)


def clean_document(text: str, cfg: CleanConfig, languages: tuple[str, ...] = ()) -> CleanResult:
    """Normalise ``text``, identify its language, and apply that language's quality filters.

    ``languages`` (a source's ``languages``): keep only documents detected as one of these codes (reason
    ``language`` otherwise; empty = all). With ``cfg.enabled`` false the text is neither normalised nor
    filtered, but the language is still identified (and selected on)."""
    if cfg.enabled:
        text = normalize(text, cfg.unicode_form)
    if cfg.langid:
        lang, score = langid.detect(text, cfg.langid_sample_chars, cfg.langid_min_chars, cfg.langid_min_confidence)
    elif languages:
        raise ValueError(f"selecting languages {list(languages)} needs clean.langid: true")
    else:
        lang, score = "", 0.0
    if languages and lang not in languages:
        return CleanResult(text, "language", lang, score)
    if not cfg.enabled:
        return CleanResult(text, "", lang, score)
    return CleanResult(text, quality_reason(text, cfg, lang), lang, score)
