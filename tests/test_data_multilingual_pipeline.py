"""The whole pipeline on the multilingual test corpus (en, de, fr, es, ru, zh, ja, ko, ar; real sentences,
planted exact copies and near duplicates, junk), default cleaning and dedup, run in this process.

Per language, from the ground truth of ``data_pipeline.multilingual_corpus``:
- kept share: the share of its good documents (unique and base) that reach the training or held-out split
  is at least 0.8 of English's (no language dropped wholesale by an English rule);
- the manifest's ``languages`` table counts within 3% of the true languages of the training documents;
- near-duplicate recall (an exact or near copy, or its base, is removed) on the pairs of shingle Jaccard
  >= 0.85 (exact copies included): >= 0.95 over all languages together and >= 0.9 in each language; >= 0.85 on
  all planted pairs of a language (J 0.8-0.95). 14 bands x 8 rows find a pair of J = 0.8 with probability
  0.924 and of J = 0.85 with 0.975, so with ~35 pairs per language a per-language 0.95 would fail by chance
  in one run of a few; the pooled bound and the per-language 0.9 fail only if detection is really worse;
- unrelated documents (unique ones and bases) removed in favour of anything but their own planted copy:
  <= 1% in each language.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.config import MixtureConfig, PackConfig, SourceConfig, SourceInput, SplitConfig, TokenizerConfig
from data_pipeline.multilingual_corpus import LANGUAGES, make_corpus
from data_pipeline.pipeline import run_pipeline
from data_pipeline.runner import Runner
from data_pipeline.stages import held_out, read_docs

pytestmark = pytest.mark.slow
DOCS_PER_LANGUAGE = 200


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    corpus = make_corpus(DOCS_PER_LANGUAGE, seed=int(np.random.default_rng().integers(1 << 30)))
    docs = corpus.documents
    order = np.random.default_rng(7).permutation(len(docs))
    (root / "raw").mkdir()
    for f in range(4):
        with open(root / "raw" / f"part-{f}.jsonl", "w", encoding="utf-8") as fh:
            for i in order[f::4]:
                d = docs[i]
                fh.write(
                    json.dumps({"id": d.id, "text": d.text, "url": d.url, "date": d.date}, ensure_ascii=False) + "\n"
                )
    split = SplitConfig(val_fraction=0.02)
    cfg = MixtureConfig(
        name="multi",
        sources=[
            SourceConfig(
                name="web", input=SourceInput(kind="jsonl", path=str(root / "raw"), metadata_fields=["url", "date"])
            )
        ],
        tokenizer=TokenizerConfig(vocab_size=1024, sample_bytes=400_000),
        pack=PackConfig(seq_len=64),
        split=split,
    )
    manifest = json.loads(Path(run_pipeline(cfg, root / "ds", runner=Runner(use_ray=False))).read_text())
    work = root / "ds" / "work"
    ids: dict[int, str] = {}
    texts: dict[str, str] = {}
    for f in sorted((work / manifest["stage_dirs"]["docs"] / "docs").glob("*.parquet")):
        d = read_docs(str(f), ["doc_id", "id", "text"])
        ids.update(zip(d["doc_id"].tolist(), d["id"].tolist()))
        texts.update(zip(d["id"].tolist(), d["text"].tolist()))
    removed: dict[str, str] = {}  # removed id -> survivor id
    for f in sorted((work / manifest["stage_dirs"]["dedup"] / "removed").glob("*.npy")):
        removed.update((ids[int(d)], ids[int(k)]) for d, k in np.load(f))
    return corpus, manifest, set(texts), removed, texts, split


def test_every_language_keeps_its_good_documents(built):
    corpus, _, cleaned, removed, _, _ = built
    share = {}
    for lang in LANGUAGES:
        good = [d.id for d in corpus.documents if d.lang == lang and d.kind in ("unique", "base")]
        share[lang] = sum(i in cleaned and i not in removed for i in good) / len(good)
    for lang in LANGUAGES:
        assert share[lang] >= 0.8 * share["en"], share


def test_manifest_language_counts_match_the_truth(built):
    corpus, manifest, cleaned, removed, texts, split = built
    truth = {d.id: d.lang for d in corpus.documents}
    train = sorted(cleaned - set(removed))
    val = held_out([texts[i] for i in train], split)
    counts = {lang: 0 for lang in LANGUAGES}
    for i, v in zip(train, val):
        if not v:
            counts[truth[i]] += 1
    got = manifest["languages"]
    for lang, n in counts.items():
        assert abs(got.get(lang, {"documents": 0})["documents"] - n) <= max(1, 0.03 * n), (lang, got, counts)


def test_near_duplicate_recall_and_false_removals_per_language(built):
    corpus, _, cleaned, removed, _, _ = built
    pooled = []
    for lang in LANGUAGES:
        copies = corpus.of(lang, "exact", "near")
        relatives: dict[str, set[str]] = {}
        for c in copies:
            relatives.setdefault(c.base, set()).add(c.id)
        pairs = [(c.id, c.base, c.jaccard) for c in copies if c.id in cleaned and c.base in cleaned]
        found = [(a in removed or b in removed, j) for a, b, j in pairs]
        strong = [f for f, j in found if j >= 0.85]
        pooled += strong
        recall = sum(strong) / max(1, len(strong))
        recall_all = sum(f for f, _ in found) / max(1, len(found))
        unrelated = [d.id for d in corpus.of(lang, "unique", "base") if d.id in cleaned]
        false = sum(i in removed and removed[i] not in relatives.get(i, set()) for i in unrelated) / len(unrelated)
        assert len(pairs) >= 0.9 * len(copies), (lang, len(pairs), len(copies))
        assert recall >= 0.9 and recall_all >= 0.85 and false <= 0.01, (lang, recall, recall_all, false)
    assert sum(pooled) / len(pooled) >= 0.95, sum(pooled) / len(pooled)
