"""Bit-reproducible dataset builds: the same inputs and mixture give byte-identical outputs.

The pipeline is run twice on one small corpus, each time in a fresh ``python -m data_pipeline run`` process
with its own local Ray and a different ``PYTHONHASHSEED``; every output file (tokenizer.json, quarantine,
each source's parts.json and MDS parts, the stage caches under work/, manifest.json, report) must be
byte-identical. The run record is the one exception: ``created``, ``seconds`` and the stage wall times and
worker memory in manifest.json and the timing columns of report.md's stage table, which are compared with
those values blanked; completion records (``_done/``) are compared like every other file.

The corpus is sized so that order matters: the plays come in several input files (tasks that finish in
any order), each source packs into several parts (``part_tokens``), and the tokenizer sample is smaller
than the corpus, so a stage that followed task completion order would show up as a difference.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from data_pipeline.embedded_corpus import shakespeare_documents
from tests.harness import run_command

pytestmark = pytest.mark.slow

RUN_RECORD_KEYS = ("seconds", "docs_per_s", "mb_per_s", "worker_peak_rss_mb")
# files in the order the pipeline writes them, so that the first difference points at the earliest stage
WRITE_ORDER = (
    "work/docs-",
    "quarantine.jsonl",
    "work/dedup-",
    "work/tokenizer-",
    "tokenizer.json",
    "work/tokens-",
    "shards/",
    "val/",
    "report.",
    "manifest.json",
)


def _write_mixture(root: Path) -> Path:
    """60 Shakespeare scenes as three gzipped JSONL files (plus an exact and a near copy and one bad line) and
    the embedded Python reference, packed in parts of about 20K tokens."""
    scenes = list(shakespeare_documents())[:60]
    lines = [json.dumps({"id": d["id"], "text": d["text"]}) for d in scenes]
    lines.append(json.dumps({"id": "copy-a", "text": scenes[7]["text"]}))
    near = scenes[11]["text"].split("\n")
    lines.append(json.dumps({"id": "near-b", "text": "\n".join(near[:3] + near[4:])}))
    lines.insert(5, '{"id": "broken", "text": ')
    (root / "plays").mkdir()
    for i in range(3):
        with gzip.open(root / "plays" / f"plays-{i}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(lines[i::3]) + "\n")
    mixture = root / "mix.yaml"
    mixture.write_text(
        yaml.safe_dump(
            {
                "name": "repro",
                "seed": 5,
                "sources": [
                    {"name": "plays", "weight": 0.6, "input": {"kind": "jsonl", "path": str(root / "plays")}},
                    {"name": "pydocs", "weight": 0.4, "input": {"kind": "embedded", "path": "python_docs"}},
                ],
                "clean": {"min_words": 20, "max_symbol_word_ratio": 0.3, "min_alpha_word_frac": 0.5},
                "tokenizer": {"vocab_size": 512, "sample_bytes": 300_000},
                "pack": {"seq_len": 64, "part_tokens": 20_000},
                "split": {"val_fraction": 0.05, "min_val_docs_per_file": 1},
                "ray": {"num_cpus": 1, "object_store_mb": 200},
            }
        )
    )
    return mixture


def _build(mixture: Path, out: Path, hash_seed: int) -> None:
    r = run_command(
        [sys.executable, "-m", "data_pipeline", "run", "--mixture", str(mixture), "--output", str(out)],
        timeout=300,
        env={"PYTHONHASHSEED": str(hash_seed), "DATA_PIPELINE_PROGRESS": "0", "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert r.returncode == 0, f"build into {out} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"


def _comparable(path: Path, rel: str) -> bytes:
    """The file's bytes, with the run record (timestamp, wall times) blanked in manifest.json and report.md."""
    data = path.read_bytes()
    if rel == "manifest.json":
        m = json.loads(data)
        m["created"] = m["seconds"] = ""
        m["stages"] = [{k: (None if k in RUN_RECORD_KEYS else v) for k, v in st.items()} for st in m["stages"]]
        return json.dumps(m, indent=1).encode()
    if rel == "report.md":  # stage rows: | name | seconds | tasks | skipped | documents | MB | docs/s | MB/s |
        text = re.sub(
            r"^\| ([\w-]+) \| [\d.]+ \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \| \d+ \| [\d.]+ \|$",
            r"| \1 | - | \2 | \3 | \4 | \5 | - | - |",
            data.decode(),
            flags=re.MULTILINE,
        )
        return text.encode()
    return data


def _outputs(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): _comparable(p, str(p.relative_to(d))) for p in sorted(d.rglob("*")) if p.is_file()}


def _write_order(name: str) -> tuple[int, str]:
    return next((i for i, prefix in enumerate(WRITE_ORDER) if name.startswith(prefix)), len(WRITE_ORDER)), name


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    mixture = _write_mixture(tmp_path)
    outs = [tmp_path / "a", tmp_path / "b"]
    with ThreadPoolExecutor(2) as pool:  # two independent processes, each with its own Ray
        list(pool.map(_build, [mixture] * 2, outs, [1, 2]))
    a, b = _outputs(outs[0]), _outputs(outs[1])
    assert any(k.startswith("shards/plays/") for k in a) and "tokenizer.json" in a
    names = sorted(set(a) | set(b), key=_write_order)
    differing = [k for k in names if a.get(k) != b.get(k)]
    if differing:
        first = differing[0]
        how = "content differs" if first in a and first in b else f"only in build {'a' if first in a else 'b'}"
        pytest.fail(
            f"first differing file: {first} ({how}); {len(differing)} of {len(names)} files differ: {differing[:8]}"
        )
    manifest = json.loads(a["manifest.json"])
    assert manifest["counts"]["dedup"]["removed"] >= 2 and manifest["counts"]["ingest"]["quarantined"] == 1
    assert manifest["sources"]["plays"]["parts"] >= 2  # several pack tasks per source
    assert manifest["validation"] and manifest["counts"]["validation"] >= 3
