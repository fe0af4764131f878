"""What the trainer calls: ``ensure_dataset``, ``build_loader``, ``load_tokenizer``.

``ensure_dataset`` builds (or resumes, or finds) the packed dataset of a mixture at a vocabulary size and
sequence length::

    shards_dir/<name>-v<vocab>-<key>/work/          stage caches (docs, dedup, tokenizer, tokens), shared
    shards_dir/<name>-v<vocab>-<key>/s<seq_len>-<h>/ one dataset per sequence length (manifest.json, shards/)

``key`` hashes every setting up to tokenization (not the weights: mixing happens at load time), ``h`` the
pack settings; so the next sequence-length stage of a run re-packs the cached tokens and nothing else.
Concurrent callers (several ranks, several jobs on one shared filesystem) serialise on an ``fcntl`` lock
file; the manifest is the last file a build writes, so a reader never sees half a dataset, and a build
killed at any point resumes where it stopped the next time anyone asks for it.
"""

from __future__ import annotations

import fcntl
import logging
import time
from pathlib import Path

from data_pipeline.config import LoaderConfig, load_mixture, settings_key
from data_pipeline.loader import Loader
from data_pipeline.manifest import MANIFEST, ManifestError, read_manifest
from data_pipeline.mds_reader import DEFAULT_CACHE_LIMIT_BYTES

log = logging.getLogger(__name__)


def _configured(mixture: str, vocab_size: int, seq_len: int, tokenizer: str):
    cfg = load_mixture(mixture)
    cfg.tokenizer.vocab_size = vocab_size
    cfg.pack.seq_len = seq_len
    if tokenizer:
        cfg.tokenizer.path = str(Path(tokenizer).resolve())
    return cfg


def build_root(shards_dir: str | Path, mixture: str, vocab_size: int, tokenizer: str = "") -> Path:
    """The directory holding the stage caches and every sequence length's dataset of this mixture."""
    cfg = _configured(mixture, vocab_size, 0, tokenizer)
    st = cfg.stage_settings()
    key = settings_key([st["docs"], st["dedup"], st["tokenizer"]])
    return Path(shards_dir) / f"{cfg.name}-v{vocab_size}-{key}"


def dataset_dir(shards_dir: str | Path, mixture: str, vocab_size: int, seq_len: int, tokenizer: str = "") -> Path:
    cfg = _configured(mixture, vocab_size, seq_len, tokenizer)
    return (
        build_root(shards_dir, mixture, vocab_size, tokenizer)
        / f"s{seq_len}-{settings_key(cfg.stage_settings()['pack'])[:8]}"
    )


def _valid(path: Path) -> bool:
    try:
        read_manifest(path)
        return True
    except ManifestError:
        return False


def ensure_dataset(shards_dir: str, mixture: str, vocab_size: int, seq_len: int, tokenizer: str = "") -> Path:
    """Return the manifest of (mixture, vocab_size, seq_len[, tokenizer]) under ``shards_dir``, building (or
    resuming) it if missing. Starts a local Ray (the machine's CPUs, bounded object store) when none is
    running and shuts it down afterwards; joins ``RAY_ADDRESS`` when set."""
    cfg = _configured(mixture, vocab_size, seq_len, tokenizer)
    final = dataset_dir(shards_dir, mixture, vocab_size, seq_len, tokenizer)
    manifest = final / MANIFEST
    if _valid(manifest):
        return manifest
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{final.name}.lock", "w") as lock:
        t0 = time.time()
        fcntl.flock(lock, fcntl.LOCK_EX)
        if time.time() - t0 > 1:
            log.info("ensure_dataset: waited %.0f s for another process building %s", time.time() - t0, final)
        if _valid(manifest):
            return manifest
        from data_pipeline.pipeline import run_pipeline
        from data_pipeline.ray_session import ray_session

        log.info(
            "ensure_dataset: building %s (mixture %s, vocab %d, seq_len %d; stage caches in %s)",
            final,
            mixture,
            vocab_size,
            seq_len,
            root / "work",
        )
        with ray_session(cfg.ray.num_cpus, cfg.ray.object_store_mb):
            run_pipeline(cfg, final, work_dir=root / "work")
    return manifest


def build_loader(
    manifest_or_dir: str | Path,
    mixture: str | dict | None,
    seq_len: int,
    global_batch: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    loader_cfg: LoaderConfig | None = None,
    prefetch: int = 0,
    cache_dir: str | Path | None = None,
    cache_limit_bytes: int | None = DEFAULT_CACHE_LIMIT_BYTES,
) -> Loader:
    """This rank's micro-batch iterator (see :mod:`data_pipeline.loader` for the order and resume rules).

    ``manifest_or_dir``: a local dataset or an object-store URL (``s3://bucket/ds``). ``mixture``: the mixture
    YAML (its weights and ``loader`` section), a ``{source: weight}`` dict, or None for the weights the dataset
    was built with. ``prefetch``: micro-batches read ahead by a background thread (0 = off; same batches either
    way). ``cache_dir`` / ``cache_limit_bytes``: the local cache of remote shards (None = read into memory)."""
    return Loader(
        manifest_or_dir,
        mixture,
        seq_len,
        global_batch,
        micro_batch,
        dp_rank,
        dp_size,
        seed,
        loader_cfg,
        prefetch=prefetch,
        cache_dir=cache_dir,
        cache_limit_bytes=cache_limit_bytes,
    )


def load_tokenizer(manifest: str | Path):
    """The dataset's ``tokenizers.Tokenizer``; its PAD/BOS/EOS ids are in ``manifest["special_tokens"]``."""
    from data_pipeline.tokenizer import load

    path, m = read_manifest(manifest)
    from data_pipeline import storage
    from data_pipeline.manifest import dataset_root

    url = storage.join(dataset_root(path), m["tokenizer"])
    if not storage.is_remote(url):
        return load(url)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        storage.download_file(url, Path(tmp) / "tokenizer.json")
        return load(Path(tmp) / "tokenizer.json")


def special_tokens(manifest: str | Path) -> dict[str, int]:
    """``{"pad": id, "bos": id, "eos": id}`` of the dataset's tokenizer."""
    return dict(read_manifest(manifest)[1]["special_tokens"])
