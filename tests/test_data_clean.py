"""Clean stage: normalisation and each quality filter on crafted documents (no Ray needed)."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from data_pipeline.clean import clean_batch, normalize, quality_reason
from data_pipeline.config import CleanConfig, DataConfigError, mixture_from_dict

WORDS = ["the", "river", "runs", "past", "old", "stone", "walls", "and", "green", "fields", "where", "farmers", "work", "with", "patient", "hands", "to", "bring", "in", "the", "harvest", "that", "will", "feed", "the", "town", "through", "winter"]


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


@pytest.mark.parametrize("make,reason", [
    (lambda r: "the and of " * 5, "too_short"),
    (lambda r: " ".join(["a"] * 60) + " the and", "mean_word_length"),
    (lambda r: prose(r, 60) + " " + "# " * 20, "symbol_ratio"),
    (lambda r: "\n".join("- " + line for line in prose(r, 80).split("\n")), "bullet_lines"),
    # two sentences per line keep '...' under the symbol-ratio limit (1 per ~22 words)
    (lambda r: "\n".join(a + " " + b + "..." for a, b in zip(*[iter(prose(r, 160).split("\n"))] * 2)),
     "ellipsis_lines"),
    (lambda r: prose(r, 60) + " " + " ".join(str(10**5 + 7 * i) for i in range(200)), "alpha_words"),
    (lambda r: " ".join(w for w in prose(r, 120).split() if w.lower().strip(".") not in
                        {"the", "and", "to", "with", "that", "of", "be", "have"}), "stop_words"),
    (lambda r: "\n".join([prose(r, 60)] + ["the farmers work with patient hands."] * 12), "dup_lines"),
])
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


def test_clean_batch_counts_and_passes_quarantine_rows():
    rng = np.random.default_rng(2)
    texts = [prose(rng, 100), "too short", "bad line", prose(rng, 90)]
    batch = {"id": np.array(["a", "b", "", "d"], dtype=object), "text": np.array(texts, dtype=object),
             "source": np.array(["s"] * 4, dtype=object), "loc": np.array(["f:1", "f:2", "f:3", "f:4"], dtype=object),
             "reason": np.array(["", "", "malformed_json", ""], dtype=object)}
    out = clean_batch(batch, CleanConfig())
    assert list(out["reason"]) == ["", "filter:too_short", "malformed_json", ""]
    assert out["text"][1] == "" and out["nbytes"][0] == len(texts[0].encode())


def test_mixture_config_errors_name_the_key():
    with pytest.raises(DataConfigError, match="did you mean 'weight'"):
        mixture_from_dict({"sources": [{"name": "a", "wieght": 1, "input": {"path": "x"}}]})
    with pytest.raises(DataConfigError, match="kind"):
        mixture_from_dict({"sources": [{"name": "a", "input": {"kind": "csv", "path": "x"}}]})
    with pytest.raises(DataConfigError, match="sources"):
        mixture_from_dict({"name": "x"})
    cfg = mixture_from_dict({"sources": [{"name": "a", "weight": 3, "input": {"path": "x"}},
                                         {"name": "b", "input": {"path": "y"}}]})
    assert cfg.weights() == {"a": 0.75, "b": 0.25}
