"""Scripts written without spaces between words, and the token sequence the per-document rules share.

Spaceless scripts: Han (CJK ideographs with their extensions, radicals, compatibility forms and the marks
々 〆 〇), Hiragana, Katakana (with the half-width forms), Bopomofo, Thai, Lao, Tibetan, Myanmar and Khmer.
Hangul is written with spaces between words and is not one of them.

``tokens(text)`` is the whitespace words of ``text``, except that every character of a spaceless script is a
token by itself::

    tokens("我们 like 東京タワー")  ->  ["我", "们", "like", "東", "京", "タ", "ワ", "ー"]

A document is *spaceless* when spaceless-script characters are at least half of its tokens,

    spaceless(text)  <=>  #{t in tokens(text) : t is a spaceless character} >= 0.5 * |tokens(text)|,

which keeps a Chinese or Japanese document with English terms in it spaceless and an English document
that quotes a few Chinese words word-based. The decision uses the characters only (no language id), so
cleaning, MinHash shingles and decontamination agree on every document.
"""

from __future__ import annotations

import re

_RANGES = (
    "\u0e00-\u0e7f"  # Thai
    "\u0e80-\u0eff"  # Lao
    "\u0f00-\u0fff"  # Tibetan
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u19e0-\u19ff"  # Khmer symbols
    "\u2e80-\u2fdf"  # CJK and Kangxi radicals
    "\u3005-\u3007"  # 々 〆 〇
    "\u3021-\u3029\u3038-\u303b"  # Hangzhou numerals, 〻
    "\u3040-\u309f"  # Hiragana
    "\u30a0-\u30ff"  # Katakana
    "\u3100-\u312f\u31a0-\u31bf"  # Bopomofo
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\ua9e0-\ua9ff\uaa60-\uaa7f"  # Myanmar extensions
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff66-\uff9f"  # half-width Katakana
    "\U00020000-\U0003134f"  # CJK extensions B-G and compatibility supplement
)
SPACELESS_CHAR = re.compile(f"[{_RANGES}]")
_TOKEN = re.compile(f"[{_RANGES}]|[^\\s{_RANGES}]+")


def has_spaceless(text: str) -> bool:
    """Whether ``text`` contains any spaceless-script character (an ASCII text never does: O(1) check)."""
    return not text.isascii() and SPACELESS_CHAR.search(text) is not None


def tokens(text: str) -> list[str]:
    """Whitespace words, with every spaceless-script character a token of its own."""
    if not has_spaceless(text):
        return text.split()
    return _TOKEN.findall(text)


def split_tokens(text: str) -> tuple[list[str], bool]:
    """``(tokens(text), spaceless(text))`` in one pass over the text."""
    if not has_spaceless(text):
        return text.split(), False
    toks = _TOKEN.findall(text)
    return toks, 2 * len(SPACELESS_CHAR.findall(text)) >= len(toks)


def is_spaceless(text: str) -> bool:
    return split_tokens(text)[1]
