"""Test fixture: the tiny dataset the other tests use (``runs/data/tiny``), built (or found) with the data
pipeline's own held-out split (``manifest["validation"]``, see data_pipeline/README.md "Held-out split").

``shards_dir_with_validation(dest, seq_lens)`` builds the datasets for those sequence lengths (one build root;
a second seq_len only re-packs) and returns the ``data.shards_dir`` to train from. ``dest`` is unused (kept so
that callers can later ask for a private copy).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIXTURE = "data_pipeline/configs/default_mixture.yaml"
BASE_SHARDS = REPO / "runs" / "data" / "tiny"


def shards_dir_with_validation(dest: Path, seq_lens: tuple[int, ...] = (32,), vocab_size: int = 4096) -> Path:
    from data_pipeline.api import ensure_dataset
    from data_pipeline.manifest import read_manifest

    for seq_len in seq_lens:
        _, m = read_manifest(ensure_dataset(str(BASE_SHARDS), str(REPO / MIXTURE), vocab_size, seq_len))
        assert m.get("validation"), "the pipeline wrote no validation split"
    return BASE_SHARDS
