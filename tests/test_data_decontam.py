"""Decontamination: planted evaluation passages found in training documents (words and CJK characters)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from data_pipeline.config import DataConfigError, DecontamConfig, mixture_from_dict
from data_pipeline.decontam import Decontaminator, read_eval_texts
from data_pipeline.minhash import shingle_tokens
from data_pipeline.multilingual_corpus import SENTENCES, make_corpus


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(40, languages=("en", "de", "zh", "ja"), seed=int(np.random.default_rng(5).integers(1 << 20)))


def _eval_files(tmp_path, rng):
    """An English JSONL (question + choices), a gzipped German JSONL and a Chinese/Japanese text file."""
    en = [{"question": q, "choices": ["yes", "no"]} for q in rng.choice(SENTENCES["en"], 5, replace=False)]
    (tmp_path / "en.jsonl").write_text("\n".join(json.dumps(r) for r in en) + "\n")
    de = [{"question": q} for q in rng.choice(SENTENCES["de"], 5, replace=False)]
    with gzip.open(tmp_path / "de.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r, ensure_ascii=False) for r in de) + "\n")
    cjk = list(rng.choice(SENTENCES["zh"], 4, replace=False)) + list(rng.choice(SENTENCES["ja"], 4, replace=False))
    (tmp_path / "cjk.txt").write_text("\n\n".join(cjk) + "\n")
    files = [str(tmp_path / "en.jsonl"), str(tmp_path / "de.jsonl.gz"), str(tmp_path / "cjk.txt")]
    return files, {"en": [r["question"] for r in en], "de": [r["question"] for r in de], "zh": cjk[:4], "ja": cjk[4:]}


def test_planted_passages_are_found_and_clean_documents_are_not(tmp_path, corpus):
    rng = np.random.default_rng(11)
    files, evals = _eval_files(tmp_path, rng)
    cfg = DecontamConfig(files=files, text_fields=["question", "choices"])
    dc = Decontaminator.from_config(cfg)
    assert dc.texts == 5 + 5 + 8  # "yes"/"no" are below min_tokens and not indexed
    for lang, passages in evals.items():
        docs = [d for d in corpus.documents if d.lang == lang and d.kind == "unique"]
        clean = [d for d in docs if not any(p in d.text for p in passages)]
        assert clean and all(dc.matches(d.text) == 0 for d in clean), lang
        dirty = [d for d in docs if any(p in d.text for p in passages)]
        assert dirty and all(dc.matches(d.text) >= 1 for d in dirty), lang
        # a passage pasted into an unrelated document of another language is found too
        host = corpus.documents[0].text
        assert dc.matches(host + "\n\n" + passages[0]) >= 1


def test_ngram_boundary_words_and_characters():
    en = " ".join(SENTENCES["en"][:2])  # > 13 words
    words = en.split()
    dc = Decontaminator([en], ngram=13, min_tokens=8)
    assert dc.matches("unrelated start " + " ".join(words[3:16]) + " unrelated end") == 1  # one 13-gram
    assert dc.matches("unrelated start " + " ".join(words[3:15]) + " unrelated end") == 0  # 12 words
    # case, punctuation and digits are simplified away, as in MinHash
    assert dc.matches(" ".join(words[:14]).upper().replace(",", " ;")) == 2
    zh = SENTENCES["zh"][0] + SENTENCES["zh"][1]
    dc = Decontaminator([zh], char_ngram=20)
    chars = shingle_tokens(zh)[0]  # punctuation is not a token
    assert dc.matches("今天我们" + "".join(chars[5:25]) + "天气很好") == 1
    assert dc.matches("今天我们" + "".join(chars[5:24]) + "天气很好") == 0
    # a short evaluation text (>= min_tokens, < n) matches only whole
    q = "What is the capital city of the country France?"
    dc = Decontaminator([q], ngram=13, min_tokens=8)
    assert dc.lengths == (9,) and dc.matches("Quiz: what is the capital city of the country France? Paris.") == 1
    assert dc.matches("what is the capital city of the country") == 0


def test_bad_eval_files_and_config_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line of text here"}\nnot json\n')
    with pytest.raises(DataConfigError, match="bad.jsonl:2"):
        list(read_eval_texts(str(bad)))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"prompt": "a question about rivers and stone walls"}\n')
    with pytest.raises(DataConfigError, match="text_fields"):
        list(read_eval_texts(str(wrong)))
    with pytest.raises(OSError, match="missing.jsonl"):
        Decontaminator.from_files([str(tmp_path / "missing.jsonl")])
    src = {"sources": [{"name": "a", "input": {"path": "x"}}]}
    with pytest.raises(DataConfigError, match="decontam.mode"):
        mixture_from_dict({**src, "decontam": {"mode": "drop"}})
    with pytest.raises(DataConfigError, match="did you mean 'ngram'"):
        mixture_from_dict({**src, "decontam": {"ngrams": 8}})
    cfg = mixture_from_dict({**src, "decontam": {"files": ["e.jsonl"], "ngram": 8, "mode": "tag"}})
    assert cfg.decontam.ngram == 8 and cfg.decontam.mode == "tag" and cfg.decontam.char_ngram == 20
    assert Decontaminator([]).matches("anything at all") == 0
