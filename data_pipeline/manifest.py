"""The dataset manifest (``manifest.json``) and its human report (``report.md`` + ``report.png``).

``manifest.json`` keys (an interface the trainer and ``ensure_dataset`` rely on):

- ``version`` (2), ``name``, ``fingerprint`` (hash of every setting the shards depend on: the loader checks
  it on resume), ``created``, ``seconds``, ``stage_keys`` (each stage's cache key), ``stage_dirs``
  (each stage's directory under the work dir)
- ``seq_len``, ``sample_len`` (= seq_len + 1), ``vocab_size``, ``tokenizer`` (path relative to the manifest),
  ``special_tokens`` ``{pad, bos, eos}`` (ids)
- ``sources``: name -> ``{dir, weight, documents, tokens, samples, parts, dropped_tokens, bytes}``; the
  source's ``<dir>/parts.json`` lists its MDS parts ``{name, samples, bytes}`` in sample order, and each
  part directory is one MDS dataset (``index.json`` with per-shard sizes and xxh64 hashes)
- ``validation``: the held-out split, name -> ``{dir, documents, tokens, samples, parts, ...}`` (same layout)
- ``languages``: ``{iso639-1: {documents, tokens}}`` of the training split
- ``counts``: ingest rows, quarantine reasons, clean filter removals, dedup removals, kept, validation
- ``stages``: ``[{name, seconds, tasks, skipped, documents, bytes, docs_per_s, mb_per_s, worker_peak_rss_mb}]``
- ``mixture``: the full mixture configuration used

No per-shard or per-document list: a manifest stays small at any corpus size, and a trainer rank reads it,
each source's ``parts.json`` and then only the part indexes and shards it samples from.

The dataset may live in a local directory or at an object-store URL: ``read_manifest`` and ``write_manifest``
take both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_pipeline import storage

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2


class ManifestError(ValueError):
    pass


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path | str:
    """Write ``<out_dir>/manifest.json`` atomically (a local directory or an object-store URL); returns its
    path (a ``Path``) or URL (a ``str``)."""
    path = storage.join(out_dir, MANIFEST)
    storage.write_json(path, manifest, indent=1)
    return path if storage.is_remote(path) else Path(path)


def dataset_root(manifest_path: str | Path) -> str:
    """The dataset directory / URL holding ``manifest_path`` (the base of its relative ``dir`` entries)."""
    return storage.dirname(manifest_path)


def read_manifest(manifest_or_dir: str | Path) -> tuple[Path | str, dict[str, Any]]:
    """(path, manifest) of a dataset, from its directory / URL or its ``manifest.json``. The path is a ``Path``
    for a local dataset and the URL (``str``) for an object-store one (``s3://bucket/ds/manifest.json``)."""
    where = str(manifest_or_dir)
    if storage.is_remote(where):
        path: Path | str = where if where.rstrip("/").endswith("/" + MANIFEST) else storage.join(where, MANIFEST)
    else:
        path = Path(where)
        if path.is_dir():
            path = path / MANIFEST
    shown = storage.redact(path)
    try:
        raw = storage.read_bytes(path)
    except storage.ObjectNotFound as e:
        raise ManifestError(
            f"{shown}: manifest not found; build the dataset with `python -m data_pipeline run "
            "--mixture ... --output DIR` or data_pipeline.api.ensure_dataset"
        ) from e
    except storage.StorageError as e:
        raise ManifestError(f"{e} (reading the dataset manifest)") from e
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{shown}: corrupt manifest ({e}); delete the directory and rebuild") from e
    if manifest.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{shown}: manifest version {manifest.get('version')} != {MANIFEST_VERSION}; rebuild")
    return path, manifest


def write_report(out_dir: str | Path, manifest: dict[str, Any]) -> str:
    """report.md with a table per stage and report.png (tokens per source, removals, languages)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_pipeline import storage

    sources = manifest["sources"]
    counts = manifest["counts"]
    langs = manifest.get("languages", {})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = list(sources)
    axes[0].bar(names, [sources[n]["tokens"] / 1e6 for n in names], color="#4477aa")
    axes[0].set_ylabel("tokens (millions)")
    axes[0].set_title("tokens per source")
    removal = {
        "quarantined": sum(counts["quarantine"].values()),
        "filtered": sum(counts["clean"].values()),
        "exact dups": counts["dedup"].get("exact", 0),
        "near dups": counts["dedup"].get("near", 0),
    }
    axes[1].bar(list(removal), list(removal.values()), color="#cc6677")
    axes[1].set_ylabel("documents")
    axes[1].set_title(f"removed (of {counts['ingest']['documents']} ingested)")
    top = list(langs)[:20]
    axes[2].bar(top, [langs[k]["tokens"] / 1e6 for k in top], color="#228833")
    axes[2].set_ylabel("tokens (millions)")
    axes[2].set_title("languages kept")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes(storage.join(out_dir, "report.png"), buf.getvalue())

    lines = [
        f"# Dataset report: {manifest['name']}",
        "",
        (
            f"seq_len {manifest['seq_len']} (samples of {manifest['sample_len']} tokens), vocabulary "
            f"{manifest['vocab_size']}, fingerprint `{manifest['fingerprint']}`."
        ),
        "",
        "![report](report.png)",
        "",
        "## Sources (training split)",
        "",
        "| source | weight | documents | tokens | samples | parts | dropped tokens | MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, s in sources.items():
        lines.append(
            f"| {n} | {s['weight']:.3f} | {s['documents']} | {s['tokens']} | {s['samples']} | "
            f"{s['parts']} | {s['dropped_tokens']} | {s['bytes'] / 1e6:.2f} |"
        )
    val = manifest.get("validation", {})
    if val:
        lines += ["", "## Held-out split", "", "| source | documents | tokens | samples |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {s['documents']} | {s['tokens']} | {s['samples']} |" for n, s in val.items()]
    if langs:
        lines += ["", "## Languages (training split)", "", "| language | documents | tokens |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['documents']} | {v['tokens']} |" for k, v in langs.items()]
    lines += [
        "",
        "## Stages",
        "",
        "| stage | seconds | tasks | skipped | documents | MB | docs/s | MB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for st in manifest["stages"]:
        lines.append(
            f"| {st['name']} | {st['seconds']:.1f} | {st.get('tasks', '')} | {st.get('skipped', '')} | "
            f"{st['documents']} | {st['bytes'] / 1e6:.2f} | {st['docs_per_s']:.0f} | {st['mb_per_s']:.2f} |"
        )
    lines += ["", "## Removals", "", "| stage | reason | documents |", "|---|---|---:|"]
    for reason, n in sorted(counts["quarantine"].items()):
        lines.append(f"| quarantine | {reason} | {n} |")
    for reason, n in sorted(counts["clean"].items()):
        lines.append(f"| clean | {reason} | {n} |")
    lines.append(f"| dedup | exact | {counts['dedup'].get('exact', 0)} |")
    lines.append(f"| dedup | near (MinHash) | {counts['dedup'].get('near', 0)} |")
    per = counts.get("per_source", {})
    if any(e.get("decontam_removed") or e.get("decontam_tagged") for e in per.values()):
        lines += ["", "## Decontamination", "", "| source | removed | tagged |", "|---|---:|---:|"]
        lines += [f"| {n} | {e['decontam_removed']} | {e['decontam_tagged']} |" for n, e in per.items()]
    meta = manifest.get("metadata", {})
    if meta:
        lines += ["", "## Metadata (kept documents)", "", "| field | present | top domains |", "|---|---:|---|"]
        for name, e in meta.items():
            top = ", ".join(f"{h} ({n})" for h, n in list(e.get("top_domains", {}).items())[:5])
            lines.append(f"| {name} | {e['present']} | {top} |")
    parts = sum(s["parts"] for s in sources.values())
    mb = sum(s["bytes"] for s in sources.values()) / 1e6
    lines += ["", f"{parts} parts, {mb:.2f} MB of shards (xxh64 per shard in each part's index.json).", ""]
    url = storage.join(out_dir, "report.md")
    storage.write_bytes(url, "\n".join(lines).encode())
    return url
