"""The dataset manifest (``manifest.json``) and its human report (``report.md`` + ``report.png``).

``manifest.json`` keys (an interface the trainer and ``ensure_dataset`` rely on):

- ``version``, ``name``, ``fingerprint`` (hash of the mixture's data settings), ``created``
- ``seq_len``, ``sample_len`` (= seq_len + 1), ``vocab_size``, ``tokenizer`` (path relative to the manifest),
  ``special_tokens`` ``{pad, bos, eos}`` (ids)
- ``sources``: name -> ``{dir, weight, documents, tokens, samples, dropped_tokens, bytes}`` (``dir`` relative to
  the manifest; the layout under it: :mod:`data_pipeline.dataset_layout`)
- ``counts``: per-stage counts (ingest rows, quarantine reasons, clean filter removals, dedup removals)
- ``stages``: ``[{name, seconds, documents, bytes, docs_per_s, mb_per_s}]``
- ``shards``: ``[{source, file, bytes, sha256, samples}]`` (file relative to ``shards/``)
- ``mixture``: the full mixture configuration used

The dataset may live in a local directory or at an object-store URL: ``read_manifest`` and ``write_manifest``
take both.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_pipeline import storage

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


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
        raise ManifestError(f"{shown}: manifest not found; build the dataset with `python -m data_pipeline run "
                            "--mixture ... --output DIR` or data_pipeline.api.ensure_dataset") from e
    except storage.StorageError as e:
        raise ManifestError(f"{e} (reading the dataset manifest)") from e
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{shown}: corrupt manifest ({e}); delete the directory and rebuild") from e
    if manifest.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{shown}: manifest version {manifest.get('version')} != {MANIFEST_VERSION}; rebuild")
    return path, manifest


def write_report(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """report.md with a table per stage and report.png (tokens per source, removals per stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    sources = manifest["sources"]
    counts = manifest["counts"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(sources)
    axes[0].bar(names, [sources[n]["tokens"] / 1e6 for n in names], color="#4477aa")
    axes[0].set_ylabel("tokens (millions)")
    axes[0].set_title("tokens per source")
    removal = {"quarantined": sum(counts["quarantine"].values()),
               "filtered": sum(counts["clean"].values()),
               "exact dups": counts["dedup"]["exact"], "near dups": counts["dedup"]["near"]}
    axes[1].bar(list(removal), list(removal.values()), color="#cc6677")
    axes[1].set_ylabel("documents")
    axes[1].set_title(f"removed (of {counts['ingest']['documents']} ingested)")
    fig.tight_layout()
    fig.savefig(out_dir / "report.png", dpi=90)
    plt.close(fig)

    lines = [f"# Dataset report: {manifest['name']}", "",
             (f"seq_len {manifest['seq_len']} (samples of {manifest['sample_len']} tokens), vocabulary "
              f"{manifest['vocab_size']}, fingerprint `{manifest['fingerprint']}`."), "", "![report](report.png)", "",
             "## Sources", "", "| source | weight | documents | tokens | samples | dropped tokens | MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for n, s in sources.items():
        lines.append(f"| {n} | {s['weight']:.3f} | {s['documents']} | {s['tokens']} | {s['samples']} | "
                     f"{s['dropped_tokens']} | {s['bytes'] / 1e6:.2f} |")
    lines += ["", "## Stages", "", "| stage | seconds | documents | MB | docs/s | MB/s |", "|---|---:|---:|---:|---:|---:|"]
    for st in manifest["stages"]:
        lines.append(f"| {st['name']} | {st['seconds']:.1f} | {st['documents']} | {st['bytes'] / 1e6:.2f} | "
                     f"{st['docs_per_s']:.0f} | {st['mb_per_s']:.2f} |")
    lines += ["", "## Removals", "", "| stage | reason | documents |", "|---|---|---:|"]
    for reason, n in sorted(counts["quarantine"].items()):
        lines.append(f"| quarantine | {reason} | {n} |")
    for reason, n in sorted(counts["clean"].items()):
        lines.append(f"| clean | {reason} | {n} |")
    lines.append(f"| dedup | exact | {counts['dedup']['exact']} |")
    lines.append(f"| dedup | near (MinHash) | {counts['dedup']['near']} |")
    lines += ["", (f"{len(manifest['shards'])} shards, "
                   f"{sum(s['bytes'] for s in manifest['shards']) / 1e6:.2f} MB (zstd); checksums in manifest.json."), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
