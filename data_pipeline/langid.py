"""Language identification per document: py3langid (a naive Bayes model over byte n-grams, Lui & Baldwin
2012) whose model ships inside the package, so nothing is downloaded at run time.

``detect(text)`` classifies a bounded sample of the text, so its cost does not grow with the document: at
most ``sample_chars`` characters, taken as three windows (start, middle, end; cut at whitespace) when the
text is longer. The confidence is py3langid's normalised posterior of the best language, with the scores
scaled by 1/sqrt(sample bytes) before the softmax so that it is comparable across lengths:

    p(l | x) = exp(s_l / sqrt(|x|)) / sum_m exp(s_m / sqrt(|x|)),    s_l = log P(l) + sum_f log(1 + c_f) log P(f | l).

The result is ``("und", p)`` when the text has fewer than ``min_chars`` letters or when p < ``min_confidence``.
Codes are ISO 639-1 where the language has one; varieties the model tells apart inside a macrolanguage are
folded into it (yue, wuu -> zh; arz, ary -> ar; uzs -> uz; gug -> gn; kik -> ki; fuv -> ff), the few
languages without a 639-1 code keep the model's ISO 639-3 code (e.g. ``grc``, ``nso``), and ``zxx`` (no
linguistic content) is ``und``.

Measured on data_pipeline.multilingual_corpus (benchmarks/bench_multilingual.py): see that benchmark's table.
"""

from __future__ import annotations

import functools
import logging
import re

log = logging.getLogger(__name__)

UNDETERMINED = "und"
SAMPLE_CHARS = 1000
MIN_CHARS = 20
MIN_CONFIDENCE = 0.5
_NON_LETTER = re.compile(r"[\W\d_]+")
_FOLD = {
    "yue": "zh",
    "wuu": "zh",
    "arz": "ar",
    "ary": "ar",
    "uzs": "uz",
    "gug": "gn",
    "kik": "ki",
    "fuv": "ff",
    "zxx": UNDETERMINED,
}


@functools.lru_cache(maxsize=1)
def _identifier():
    """The py3langid model, loaded once per process (~0.5 s)."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as e:  # pragma: no cover - the pinned stack has it
        raise ImportError("language identification needs py3langid==0.4.0 (requirements.txt); run `make setup`") from e
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def languages() -> tuple[str, ...]:
    """Every code :func:`detect` can return (besides ``und``)."""
    return tuple(sorted({_FOLD.get(c, c) for c in _identifier().labels} - {UNDETERMINED}))


def sample(text: str, sample_chars: int = SAMPLE_CHARS) -> str:
    """``text`` itself when short, else three windows of sample_chars / 3 characters (start, middle, end),
    each trimmed to whitespace boundaries when it has any."""
    if len(text) <= sample_chars:
        return text
    w = sample_chars // 3
    parts = []
    for start in (0, (len(text) - w) // 2, len(text) - w):
        part = text[start : start + w]
        if start > 0:
            cut = part.find(" ")
            part = part[cut + 1 :] if 0 <= cut < w // 4 else part
        if start + w < len(text):
            cut = part.rfind(" ")
            part = part[:cut] if cut > 3 * len(part) // 4 else part
        parts.append(part)
    return "\n".join(parts)


def detect(
    text: str, sample_chars: int = SAMPLE_CHARS, min_chars: int = MIN_CHARS, min_confidence: float = MIN_CONFIDENCE
) -> tuple[str, float]:
    """``(code, confidence)`` of the language of ``text``; ``("und", p)`` when too short or unsure."""
    s = sample(text, sample_chars)
    if len(_NON_LETTER.sub("", s)) < min_chars:
        return UNDETERMINED, 0.0
    code, p = _identifier().classify(s)
    code = _FOLD.get(code, code)
    if p < min_confidence:
        return UNDETERMINED, float(p)
    return code, float(p)
