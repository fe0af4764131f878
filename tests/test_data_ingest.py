"""Ingest: every kind of bad input is quarantined with its reason and location, and the job completes;
Parquet and ``datasets`` directories are read with a configurable text field and kept ids."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import zstandard

from data_pipeline.config import CleanConfig, MixtureConfig, SourceConfig, SourceInput
from data_pipeline.doc_ids import describe
from data_pipeline.pipeline import Build, list_inputs
from data_pipeline.runner import Runner
from data_pipeline.stages import read_docs


def ingest(sources: list[SourceConfig], out) -> tuple[list[dict], dict[str, int]]:
    """The docs stage alone (cleaning off), in this process: (document rows, quarantine counts)."""
    cfg = MixtureConfig(sources=sources, clean=CleanConfig(enabled=False))
    b = Build(cfg, str(out), None, Runner(use_ray=False))
    _, urls, summaries = b.docs(list_inputs(cfg, b.work))
    rows = []
    for key in sorted(urls):
        d = read_docs(urls[key], ["doc_id", "id", "text", "loc"])
        rows += [
            {"doc_id": int(i), "id": str(n), "text": str(t), "loc": str(loc)}
            for i, n, t, loc in zip(d["doc_id"], d["id"], d["text"], d["loc"])
        ]
    quarantine: dict[str, int] = {}
    for s in summaries:
        for k, v in s["quarantine"].items():
            quarantine[k] = quarantine.get(k, 0) + v
    return rows, quarantine


def good_lines(rng: np.random.Generator, n: int, prefix: str) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "green", "field"]
    return [json.dumps({"id": f"{prefix}{i}", "text": " ".join(rng.choice(words, size=12))}) for i in range(n)]


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    rng = np.random.default_rng(31)
    d = tmp_path_factory.mktemp("bad")
    ok = good_lines(rng, 20, "ok")
    # plain JSONL with a malformed line (3), invalid UTF-8 (5), missing text field (7), a non-object (9)
    lines = [x.encode() for x in ok[:10]]
    lines[2] = b'{"id": "m", "text": "unterminated'
    lines[4] = b'{"id": "u", "text": "caf\xe9 latin-1 bytes"}'
    lines[6] = b'{"id": "t", "body": "no text field"}'
    lines[8] = b"[1, 2, 3]"
    (d / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (d / "empty.jsonl").write_bytes(b"")
    full = ("\n".join(good_lines(rng, 400, "gz")) + "\n").encode()
    gz = gzip.compress(full)
    (d / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])  # truncated in the middle of the stream
    zs = zstandard.ZstdCompressor().compress(full)
    (d / "cut.jsonl.zst").write_bytes(zs[: len(zs) // 2])
    (d / "fine.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(ok[10:]) + "\n").encode()))
    return d


def test_bad_inputs_are_quarantined_and_the_job_completes(bad_corpus, tmp_path):
    src = SourceConfig(name="web", input=SourceInput(kind="jsonl", path=str(bad_corpus)))
    good, quarantine = ingest([src], tmp_path)
    q = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    by_loc = {r["location"]: r["reason"] for r in q}
    assert by_loc["mixed.jsonl:3"] == "malformed_json"
    assert by_loc["mixed.jsonl:5"] == "invalid_utf8"
    assert by_loc["mixed.jsonl:7"] == "missing_text_field"
    assert by_loc["mixed.jsonl:9"] == "not_an_object"
    assert by_loc["empty.jsonl"] == "empty_file"
    assert "truncated_gzip" in {r["reason"] for r in q if r["location"].startswith("cut.jsonl.gz:")}
    assert "truncated_zstd" in {r["reason"] for r in q if r["location"].startswith("cut.jsonl.zst:")}
    assert all(r["source"] == "web" for r in q)
    assert quarantine == {k: sum(1 for r in q if r["reason"] == k) for k in quarantine}
    ids = {r["id"] for r in good}
    # the 6 good lines of mixed.jsonl, the 10 of fine.jsonl.zst, and a prefix of each truncated file
    assert {f"ok{i}" for i in (0, 1, 3, 5, 7, 9)} <= ids and {f"ok{i}" for i in range(10, 20)} <= ids
    n_gz = sum(1 for i in ids if i.startswith("gz"))
    assert 0 < n_gz < 800  # both truncated files gave the lines before the cut (400 each at most)
    # integer ids: (source 0, file index in sorted order, row among the file's documents), unique
    files = sorted(p.name for p in bad_corpus.iterdir() if p.name.endswith((".jsonl", ".gz", ".zst")))
    by_id = {r["id"]: describe(r["doc_id"]) for r in good}
    assert by_id["ok0"] == (0, files.index("mixed.jsonl"), 0) and by_id["ok3"] == (0, files.index("mixed.jsonl"), 2)
    assert len({r["doc_id"] for r in good}) == len(good)


def test_parquet_and_datasets_inputs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(8)
    texts = [" ".join(rng.choice(["a", "b", "c", "d"], size=8)) for _ in range(30)]
    pq.write_table(pa.table({"content": texts[:10], "doc": [f"p{i}" for i in range(10)]}), tmp_path / "x.parquet")
    pq.write_table(pa.table({"content": [None, "x y z"]}), tmp_path / "nulls.parquet")
    datasets.Dataset.from_dict({"body": texts[10:20]}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "t.csv").write_text("body\n" + "\n".join(texts[20:]) + "\n")
    sources = [
        SourceConfig(
            name="pq",
            input=SourceInput(kind="parquet", path=str(tmp_path / "*.parquet"), text_field="content", id_field="doc"),
        ),
        SourceConfig(name="disk", input=SourceInput(kind="hf_disk", path=str(tmp_path / "hf"), text_field="body")),
        SourceConfig(name="files", input=SourceInput(kind="hf_files", path=str(tmp_path / "files"), text_field="body")),
    ]
    rows, quarantine = ingest(sources, tmp_path / "out")
    for r in rows:
        r["source"] = ("pq", "disk", "files")[describe(r["doc_id"])[0]]
    by_source = {s: sorted(r["text"] for r in rows if r["source"] == s) for s in ("pq", "disk", "files")}
    assert by_source["pq"] == sorted(texts[:10] + ["x y z"])
    assert by_source["disk"] == sorted(texts[10:20]) and by_source["files"] == sorted(texts[20:])
    assert {r["id"] for r in rows if r["source"] == "pq"} >= {f"p{i}" for i in range(10)}
    assert quarantine == {"missing_text_field": 1}  # the null text in nulls.parquet


def test_docs_stage_carries_metadata_and_applies_filters_and_decontamination(tmp_path):
    """Planted cases through the docs stage: a blocklisted domain and a subdomain of it are removed
    (blocked_domain), a document quoting an evaluation text is removed (decontam), the rest keep their url
    and date as metadata columns; counts per reason and per source land in the summaries."""
    from data_pipeline.config import DecontamConfig, MetadataFilterConfig
    from data_pipeline.embedded_corpus import shakespeare_documents

    rng = np.random.default_rng()
    scenes = [d["text"] for d in shakespeare_documents()]
    picked = [scenes[i] for i in rng.choice(len(scenes), size=12, replace=False)]
    eval_text = " ".join(picked[0].split()[200:260])  # 60 words of one scene
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": eval_text}) + "\n")
    hosts = ["example.org", "spam.test", "www.spam.test", "example.org", "news.example.com"] + ["example.org"] * 7
    lines = [
        json.dumps({"id": f"d{i}", "text": t, "url": f"https://{h}/p/{i}", "date": f"2024-0{1 + i % 9}-01"})
        for i, (t, h) in enumerate(zip(picked, hosts))
    ]
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.jsonl").write_text("\n".join(lines) + "\n")
    cfg = MixtureConfig(
        sources=[
            SourceConfig(
                name="web", input=SourceInput(kind="jsonl", path=str(tmp_path / "web"), metadata_fields=["url", "date"])
            )
        ],
        clean=CleanConfig(enabled=False, langid=False),
        filters=MetadataFilterConfig(blocklist=["spam.test"]),
        decontam=DecontamConfig(files=[str(tmp_path / "eval.jsonl")]),
    )
    b = Build(cfg, str(tmp_path / "out"), None, Runner(use_ray=False))
    _, urls, rows = b.docs(list_inputs(cfg, b.work))
    assert rows[0]["filtered"] == {"blocked_domain": 2, "decontam": 1}
    d = read_docs(next(iter(urls.values())), ["id", "meta_url", "meta_date"])
    kept = set(d["id"])
    assert kept == {f"d{i}" for i in range(12)} - {"d0", "d1", "d2"}
    assert all(u.startswith("https://") for u in d["meta_url"]) and all(x.startswith("2024-") for x in d["meta_date"])
    assert rows[0]["metadata"]["url"]["top_domains"]["example.org"] == 8
