"""Clean stage: normalisation and each quality filter on crafted documents (no Ray needed)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from data_pipeline.clean import CleanResult, clean_document, normalize, quality_reason
from data_pipeline.config import CleanConfig, DataConfigError, mixture_from_dict
from data_pipeline.multilingual_corpus import SENTENCES

WORDS = [
    "the",
    "river",
    "runs",
    "past",
    "old",
    "stone",
    "walls",
    "and",
    "green",
    "fields",
    "where",
    "farmers",
    "work",
    "with",
    "patient",
    "hands",
    "to",
    "bring",
    "in",
    "the",
    "harvest",
    "that",
    "will",
    "feed",
    "the",
    "town",
    "through",
    "winter",
]


def prose(rng: np.random.Generator, n: int) -> str:
    """Fresh random English-like prose (seeded): sentences of shuffled words, no long repeats."""
    out = []
    while sum(len(s.split()) for s in out) < n:
        out.append(" ".join(rng.permutation(WORDS)[: rng.integers(8, 14)]).capitalize() + ".")
    return "\n".join(out)


def test_normalize_unicode_whitespace_controls():
    text = "Cafe\u0301\r\n\r\n\r\n\tdouble  space\x07 and\u200b zero width \n\n\n\nend  "
    # NFC composes e + combining acute; controls/zero-width removed; blank runs capped at one empty line
    assert normalize(text) == "Café\n\ndouble space and zero width\n\nend"
    assert normalize("ﬁ", "NFKC") == "fi"


def test_good_prose_passes_default_filters():
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert quality_reason(normalize(prose(rng, 120)), CleanConfig()) == ""


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda r: "the and of " * 5, "too_short"),
        (lambda r: " ".join(["a"] * 60) + " the and", "mean_word_length"),
        (lambda r: prose(r, 60) + " " + "# " * 20, "symbol_ratio"),
        (lambda r: "\n".join("- " + line for line in prose(r, 80).split("\n")), "bullet_lines"),
        # two sentences per line keep '...' under the symbol-ratio limit (1 per ~22 words)
        (
            lambda r: "\n".join(a + " " + b + "..." for a, b in zip(*[iter(prose(r, 160).split("\n"))] * 2)),
            "ellipsis_lines",
        ),
        (lambda r: prose(r, 60) + " " + " ".join(str(10**5 + 7 * i) for i in range(200)), "alpha_words"),
        (
            lambda r: " ".join(
                w
                for w in prose(r, 120).split()
                if w.lower().strip(".") not in {"the", "and", "to", "with", "that", "of", "be", "have"}
            ),
            "stop_words",
        ),
        (lambda r: "\n".join([prose(r, 60)] + ["the farmers work with patient hands."] * 12), "dup_lines"),
    ],
)
def test_each_filter_names_its_reason(make, reason):
    rng = np.random.default_rng(zlib.crc32(reason.encode()))
    assert quality_reason(normalize(make(rng)), CleanConfig()) == reason


def test_repeated_ngrams_filters():
    rng = np.random.default_rng(1)
    # one 5-gram phrase repeated inside otherwise unique lines: lines differ, n-gram repetition does not
    lines = [f"{w} the farmers bring in the harvest {v}" for w, v in zip(rng.permutation(WORDS), WORDS)]
    text = normalize(prose(rng, 40) + "\n" + "\n".join(lines))
    cfg = CleanConfig(max_dup_line_frac=None, max_dup_line_char_frac=None, max_top_ngram_char_frac={})
    assert quality_reason(text, cfg).startswith("dup_")
    cfg2 = CleanConfig(max_dup_line_frac=None, max_dup_line_char_frac=None)
    assert quality_reason(text, cfg2).startswith("top_")


def test_mixture_config_errors_name_the_key():
    with pytest.raises(DataConfigError, match="did you mean 'weight'"):
        mixture_from_dict({"sources": [{"name": "a", "wieght": 1, "input": {"path": "x"}}]})
    with pytest.raises(DataConfigError, match="kind"):
        mixture_from_dict({"sources": [{"name": "a", "input": {"kind": "csv", "path": "x"}}]})
    with pytest.raises(DataConfigError, match="sources"):
        mixture_from_dict({"name": "x"})
    cfg = mixture_from_dict(
        {"sources": [{"name": "a", "weight": 3, "input": {"path": "x"}}, {"name": "b", "input": {"path": "y"}}]}
    )
    assert cfg.weights() == {"a": 0.75, "b": 0.25}


def sentences(rng: np.random.Generator, lang: str, n: int) -> list[str]:
    return list(rng.choice(SENTENCES[lang], size=n, replace=False))


def test_clean_document_normalises_detects_and_names_the_reason():
    rng = np.random.default_rng(3)
    text = "  " + prose(rng, 120).replace("\n", "\r\n") + "\u200b "
    r = clean_document(text, CleanConfig())
    assert isinstance(r, CleanResult) and r.reason == "" and r.lang == "en" and r.lang_score > 0.5
    assert r.text == normalize(text)
    assert clean_document("the and of " * 5, CleanConfig()).reason == "too_short"
    off = clean_document(text, CleanConfig(enabled=False))
    assert off.text == text and off.reason == "" and off.lang == "en"
    assert clean_document(text, CleanConfig(langid=False)).lang == ""


@pytest.mark.parametrize("lang", ["zh", "ja"])
def test_character_rules_for_scripts_without_spaces(lang):
    rng = np.random.default_rng(zlib.crc32(lang.encode()))
    good = "".join(sentences(rng, lang, 8))
    cfg = CleanConfig()
    assert quality_reason(good, cfg, lang) == ""
    # the word rules would call any Chinese/Japanese paragraph too short (a few whitespace "words")
    assert len(good.split()) < cfg.min_words
    assert quality_reason("".join(sentences(rng, lang, 2)), cfg, lang) == "too_short"
    one = sentences(rng, lang, 1)[0]
    assert quality_reason(one * 6 + good, cfg, lang).startswith(("top_char_", "dup_char_"))
    assert quality_reason("\n".join([one] * 8 + [good]), cfg, lang) == "dup_lines"
    stops = "".join(sorted({ch for ch in good if ch in "的了是在和有我不这也就都人他のにはをたがでてとしな"}))
    assert stops and quality_reason(good.translate({ord(c): "口" for c in stops}), cfg, lang) == "stop_words"
    digits = good + "".join(f" {int(x)} " for x in rng.integers(10**6, 10**7, size=len(good) // 2))
    assert quality_reason(digits, cfg, lang) == "alpha_words"


@pytest.mark.parametrize("lang", ["de", "fr", "es", "ru", "ar", "ko"])
def test_word_languages_pass_and_fail_with_their_own_stop_words(lang):
    rng = np.random.default_rng(zlib.crc32(lang.encode()))
    text = " ".join(sentences(rng, lang, 8))
    assert clean_document(text, CleanConfig()).reason == ""
    assert quality_reason(text, CleanConfig(), "en") == "stop_words" or lang == "ko"
    from data_pipeline.clean import STOP_WORDS

    if lang in STOP_WORDS:
        stripped = " ".join(w for w in text.split() if w.lower().strip(".,،") not in STOP_WORDS[lang])
        assert quality_reason(stripped, CleanConfig(), lang) == "stop_words"


def test_by_language_overrides_merge_over_defaults():
    rng = np.random.default_rng(8)
    ko = " ".join(sentences(rng, "ko", 8))
    assert clean_document(ko, CleanConfig()).reason == ""
    # without the Korean default the Gopher minimum mean word length (3) drops Korean wholesale
    assert clean_document(ko, CleanConfig(by_language={"ko": {"min_mean_word_len": 3.0}})).reason == "mean_word_length"
    cfg = mixture_from_dict(
        {
            "sources": [{"name": "a", "input": {"path": "x"}}],
            "clean": {"by_language": {"de": {"min_words": 500}}, "stop_words": {"ko": ["은", "는"]}},
        }
    ).clean
    assert cfg.by_language["ko"] == {"min_mean_word_len": 1.5} and cfg.by_language["de"] == {"min_words": 500}
    assert clean_document(" ".join(sentences(rng, "de", 8)), cfg).reason == "too_short"
    with pytest.raises(DataConfigError, match="did you mean 'min_words'"):
        mixture_from_dict(
            {"sources": [{"name": "a", "input": {"path": "x"}}], "clean": {"by_language": {"de": {"min_word": 5}}}}
        )
    with pytest.raises(DataConfigError, match="by_language.de.min_words"):
        mixture_from_dict(
            {
                "sources": [{"name": "a", "input": {"path": "x"}}],
                "clean": {"by_language": {"de": {"min_words": "many"}}},
            }
        )
