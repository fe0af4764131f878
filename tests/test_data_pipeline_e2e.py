"""End to end: ``ensure_dataset`` called by two processes at once builds one dataset (real Ray, real text),
which the loader, the tokenizer API and ``verify`` then use."""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_pipeline.api import (
    build_loader,
    dataset_dir,
    ensure_dataset,
    load_tokenizer,
    special_tokens,
)
from data_pipeline.embedded_corpus import shakespeare_documents

pytestmark = pytest.mark.slow
VOCAB, SEQ = 512, 64


def _ensure(args: tuple[str, str]) -> tuple[str, float]:
    shards_dir, mixture = args
    t0 = time.time()
    path = ensure_dataset(shards_dir, mixture, VOCAB, SEQ)
    return str(path), time.time() - t0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", DATA_PIPELINE_PROGRESS="0", TOKENIZERS_PARALLELISM="false")
    root = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(41)
    scenes = list(shakespeare_documents())[:80]
    lines = [json.dumps({"id": d["id"], "text": d["text"]}) for d in scenes]
    # two planted exact copies and one near copy (a line dropped), plus two bad lines
    long_scenes = [i for i, d in enumerate(scenes) if len(d["text"].split()) > 800]
    dups = [int(i) for i in rng.choice(long_scenes, size=3, replace=False)]
    lines.append(json.dumps({"id": "copy-a", "text": scenes[dups[0]]["text"]}))
    lines.append(json.dumps({"id": "copy-b", "text": scenes[dups[1]]["text"]}))
    near = scenes[dups[2]]["text"].split("\n")
    lines.append(json.dumps({"id": "near-c", "text": "\n".join(near[:3] + near[4:])}))
    lines.insert(5, '{"id": "broken", "text": ')
    lines.insert(9, json.dumps({"id": "notext", "body": "x"}))
    with gzip.open(root / "plays.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    mixture = root / "mix.yaml"
    mixture.write_text(
        yaml.safe_dump(
            {
                "name": "e2e",
                "seed": 3,
                "sources": [
                    {"name": "plays", "weight": 0.7, "input": {"kind": "jsonl", "path": str(root / "plays.jsonl.gz")}},
                    {"name": "pydocs", "weight": 0.3, "input": {"kind": "embedded", "path": "python_docs"}},
                ],
                "clean": {
                    "min_words": 20,
                    "max_symbol_word_ratio": 0.3,
                    "min_alpha_word_frac": 0.5,
                    "max_dup_line_frac": 0.5,
                    "max_dup_line_char_frac": 0.5,
                    "max_top_ngram_char_frac": {2: 0.3},
                    "max_dup_ngram_char_frac": {5: 0.5},
                },
                "tokenizer": {"sample_bytes": 2_000_000},
                "split": {"val_fraction": 0.05, "min_val_docs_per_file": 1},
                "ray": {"num_cpus": 2, "object_store_mb": 300},
            }
        )
    )
    shards = root / "shards"
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_ensure, [(str(shards), str(mixture))] * 2)
    return shards, mixture, results, scenes, dups


def test_concurrent_ensure_dataset_builds_once(built):
    shards, mixture, results, _, _ = built
    (p1, _), (p2, _) = results
    assert p1 == p2 and Path(p1).is_file()
    final = Path(p1).parent
    assert final == dataset_dir(shards, str(mixture), VOCAB, SEQ)
    # one build root holding the stage caches and this sequence length's dataset, no temporary leftovers
    assert [p.name for p in shards.iterdir()] == [final.parent.name]
    assert sorted(p.name for p in final.parent.iterdir() if not p.name.endswith(".lock")) == sorted(
        ["work", final.name]
    )
    t0 = time.time()
    assert str(ensure_dataset(str(shards), str(mixture), VOCAB, SEQ)) == p1  # cached: no rebuild
    assert time.time() - t0 < 10
    import ray

    assert not ray.is_initialized()  # the cached call started no Ray


def test_manifest_counts_quarantine_and_dedup(built):
    _, _, results, scenes, dups = built
    manifest_path = Path(results[0][0])
    m = json.loads(manifest_path.read_text())
    root = manifest_path.parent
    assert m["seq_len"] == SEQ and m["sample_len"] == SEQ + 1 and m["vocab_size"] == VOCAB
    assert m["counts"]["quarantine"] == {"malformed_json": 1, "missing_text_field": 1}
    q = [json.loads(x) for x in (root / "quarantine.jsonl").read_text().splitlines()]
    assert {r["location"] for r in q} == {"plays.jsonl.gz:6", "plays.jsonl.gz:10"}
    removed = _removed_ids(root.parent / "work", m["stage_dirs"])
    for rid, d in (("copy-a", dups[0]), ("copy-b", dups[1]), ("near-c", dups[2])):
        # the copy comes later in the file than its original: the original survives (minimum doc id)
        assert removed.get(rid) == scenes[d]["id"], (rid, removed.get(rid))
    assert m["counts"]["dedup"]["exact"] >= 2 and m["counts"]["dedup"]["near"] >= 1
    assert set(m["sources"]) == {"plays", "pydocs"} and all(s["tokens"] > 0 for s in m["sources"].values())
    assert {"docs", "tokens", "pack"} <= {s["name"] for s in m["stages"]}
    assert set(m["validation"]) == {"plays", "pydocs"} and all(v["samples"] > 0 for v in m["validation"].values())
    assert (root / "report.md").read_text().startswith("# Dataset report") and (root / "report.png").stat().st_size
    from data_pipeline.cli import main

    assert main(["verify", "--manifest", str(manifest_path)]) == 0


def _removed_ids(work: Path, dirs: dict[str, str]) -> dict[str, str]:
    """{removed document's id: its survivor's id} from the dedup stage's removal lists and the docs partitions."""
    from data_pipeline.stages import read_docs

    names: dict[int, str] = {}
    for f in sorted((work / dirs["docs"] / "docs").glob("*.parquet")):
        d = read_docs(str(f), ["doc_id", "id"])
        names.update(zip(d["doc_id"].tolist(), d["id"].tolist()))
    out = {}
    for f in sorted((work / dirs["dedup"] / "removed").glob("*.npy")):
        for doc, kept in np.load(f):
            out[names[int(doc)]] = names[int(kept)]
    return out


def test_loader_and_tokenizer_on_built_dataset(built):
    _, mixture, results, _, _ = built
    manifest = results[0][0]
    tok = load_tokenizer(manifest)
    ids = special_tokens(manifest)
    assert tok.token_to_id("<|eos|>") == ids["eos"] and tok.get_vocab_size() <= VOCAB
    loader = build_loader(manifest, str(mixture), SEQ, global_batch=8, micro_batch=4, dp_rank=1, dp_size=2, seed=5)
    batch = next(loader)
    assert batch["tokens"].shape == (4, SEQ + 1) and batch["doc_ids"].shape == (4, SEQ + 1)
    toks, dids = batch["tokens"], batch["doc_ids"]
    # every change of doc_ids comes right after an EOS token, and EOS belongs to the document it ends
    change = np.diff(dids, axis=1) == 1
    assert (toks[:, :-1][change] == ids["eos"]).all()
    text = tok.decode(toks[0].tolist())
    assert len(text) > SEQ  # byte-level BPE on English: several characters per token
