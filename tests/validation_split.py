"""Test fixture: a tiny dataset with a ``validation`` split in its manifest, for the evaluation tests.

STAND-IN for the data pipeline's held-out split: until the pipeline sets one aside itself, this builds (or
reuses) the tiny dataset the other tests use (``runs/data/tiny``, ``data_pipeline.api.ensure_dataset``), then
writes a sibling ``shards_dir`` whose dataset directory links the training files, holds *copies* of the
training source directories as ``validation/<source>`` and a manifest with the ``validation`` entry
(data_pipeline.validation). The copies are training data, so the losses on them say nothing about
generalisation; the tests only need a split with the real format. When the pipeline writes the split, this
function returns ``REPO/runs/data/tiny`` unchanged (one place to switch).

The trainer finds the dataset as usual: ``ensure_dataset(shards_dir, mixture, vocab, seq_len)`` looks for
``<shards_dir>/<name>-v<vocab>-s<seq_len>-<fingerprint>/manifest.json``, the name this writes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIXTURE = "data_pipeline/configs/default_mixture.yaml"
BASE_SHARDS = REPO / "runs" / "data" / "tiny"


def shards_dir_with_validation(dest: Path, seq_lens: tuple[int, ...] = (32,), vocab_size: int = 4096) -> Path:
    """A ``data.shards_dir`` under ``dest`` whose tiny datasets (one per seq_len) have a validation split."""
    from data_pipeline.api import ensure_dataset
    from data_pipeline.manifest import read_manifest, write_manifest

    dest = Path(dest)
    for seq_len in seq_lens:
        base_manifest = ensure_dataset(str(BASE_SHARDS), str(REPO / MIXTURE), vocab_size, seq_len)
        base, m = read_manifest(base_manifest)
        if m.get("validation"):                    # the pipeline's own split: nothing to fake
            return BASE_SHARDS
        out = dest / base.parent.name
        if (out / "manifest.json").exists():
            continue
        tmp = dest / f".{base.parent.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for entry in base.parent.iterdir():       # training shards, tokenizer, reports: links
            if entry.name != "manifest.json":
                (tmp / entry.name).symlink_to(entry.resolve())
        m["validation"] = {}
        for name, src in m["sources"].items():
            shutil.copytree(base.parent / src["dir"], tmp / "validation" / name)
            m["validation"][name] = {"dir": f"validation/{name}", "samples": src["samples"],
                                     "documents": src["documents"], "tokens": src["tokens"]}
        write_manifest(tmp, m)
        os.rename(tmp, out)
    return dest
