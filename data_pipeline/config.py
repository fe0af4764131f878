"""Typed configuration of the data pipeline, loaded from a mixture YAML.

A mixture file names the sources and their sampling weights; optional sections tune each stage::

    name: default
    seed: 1234
    sources:
      - name: kjv
        weight: 0.6
        input: {kind: embedded, path: kjv}
      - name: web
        weight: 0.4
        input: {kind: jsonl, path: /data/web/*.jsonl.zst, text_field: content}
    clean: {min_words: 20}
    dedup: {bands: 14, rows: 8}
    tokenizer: {vocab_size: 4096}
    pack: {seq_len: 128}
    loader: {period: 10000}

Unknown keys are rejected with an error naming the file, the key and the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

INPUT_KINDS = ("jsonl", "parquet", "hf_disk", "hf_files", "embedded")
# Bumped whenever the pipeline writes different outputs from the same config (2: packing independent of Ray's
# block layout; 3: stage tasks per input file, integer document ids, parts.json layout, held-out split);
# part of every stage key, hence of the cache directory names.
SHARD_LAYOUT_VERSION = 3


# dedup settings that change how the work is split, not its result (the removal lists are the same)
DEDUP_PARALLELISM = ("band_ranges", "exact_ranges", "cc_partitions", "cc_single_task_edges", "max_cc_rounds",
                     "partitions_per_collect")


class DataConfigError(ValueError):
    """A configuration problem; the message names the file/key and the fix."""


@dataclass
class SourceInput:
    """Where one source's documents come from.

    kind: ``jsonl`` (plain, .gz, .zst; a file, a directory or a glob), ``parquet``, ``hf_disk`` (a directory
    written by ``datasets.save_to_disk``), ``hf_files`` (local data files read with ``datasets.load_dataset``),
    ``embedded`` (a corpus shipped with the installed packages: ``kjv``, ``shakespeare``, ``python_docs``).
    """

    kind: str = "jsonl"
    path: str = ""
    text_field: str = "text"
    id_field: str = "id"          # kept as the document id when present, else ``source/file:line``


@dataclass
class SourceConfig:
    name: str = ""
    weight: float = 1.0
    input: SourceInput = field(default_factory=SourceInput)


@dataclass
class CleanConfig:
    """Normalisation and Gopher/FineWeb-style quality filters; ``null`` disables a filter.

    Ratios follow Rae et al. 2021 (Gopher, App. A) and FineWeb's repetition rules.
    """

    enabled: bool = True
    unicode_form: str = "NFC"                  # NFC | NFKC | none
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_len: float | None = 3.0
    max_mean_word_len: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1     # ('#' + '...' + '…') / words
    max_bullet_line_frac: float | None = 0.9
    max_ellipsis_line_frac: float | None = 0.3
    min_alpha_word_frac: float | None = 0.8       # words with at least one letter
    min_stop_words: int | None = 2                # of {the, be, to, of, and, that, have, with}
    max_dup_line_frac: float | None = 0.3
    max_dup_line_char_frac: float | None = 0.2
    max_top_ngram_char_frac: dict[int, float] = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_dup_ngram_char_frac: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


@dataclass
class DedupConfig:
    """Exact (content hash) and MinHash-LSH near-duplicate removal (see :mod:`data_pipeline.dedup`).

    With b bands of r rows, a pair of Jaccard similarity s becomes a candidate with probability
    P(s) = 1 - (1 - s^r)^b; the threshold (1/b)^(1/r) is 0.72 for 14 x 8.

    The remaining keys set only the parallelism (how many tasks and files each sub-step uses), never which
    documents are removed; ``0`` = automatic.
    """

    exact: bool = True
    minhash: bool = True
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1
    band_ranges: int = 1           # tasks per band: each merges the keys of one hash range of the band
    exact_ranges: int = 0          # tasks of the exact reduce (content-hash ranges); 0 = bands * band_ranges
    cc_partitions: int = 0         # node-hash partitions of the distributed components; 0 = bands * band_ranges
    cc_single_task_edges: int = 20_000_000   # up to this many candidate edges: components in one task
    max_cc_rounds: int = 64        # large-star / small-star rounds before giving up
    partitions_per_collect: int = 64         # input partitions per task writing the removal lists


@dataclass
class TokenizerConfig:
    path: str = ""                 # an existing tokenizer.json; empty = train a byte-level BPE
    vocab_size: int = 4096
    sample_bytes: int = 16_000_000  # training sample, drawn across sources in proportion to their size
    min_frequency: int = 2
    bos: str = "<|bos|>"
    eos: str = "<|eos|>"
    pad: str = "<|pad|>"


@dataclass
class PackConfig:
    seq_len: int = 128             # samples hold seq_len + 1 tokens
    add_bos: bool = False          # documents are separated by EOS; BOS optional
    shard_size_limit: int = 1 << 24
    compression: str = "zstd"
    part_tokens: int = 1 << 27     # tokens per pack task / MDS part (consecutive input files of one source;
                                   # the packing tail of each part, < seq_len + 1 tokens, is dropped)


@dataclass
class SplitConfig:
    """The held-out (validation) split: a document is held out when xxh3(text) / 2^64 < val_fraction (its
    exact copies were removed by dedup, so no copy of it is trained on), plus, per input file, the
    ``min_val_docs_per_file`` documents of smallest hash (so small sources get a few)."""

    val_fraction: float = 0.005
    min_val_docs_per_file: int = 0


@dataclass
class LoaderConfig:
    """The exact interleave loader (data_pipeline.loader.Loader); ``loader.streaming_dataset`` builds the
    StreamingDataset-of-Streams alternative from the same mixture."""

    period: int = 10_000           # interleave period: weights are quantised to 1/period
    shuffle_block: int = 4096      # samples permuted together (bounded shard cache)
    cache_shards: int = 16         # decompressed shards kept per source


@dataclass
class RayConfig:
    num_cpus: int = 0              # 0 = the machine's CPUs (local Ray only)
    object_store_mb: int = 300


@dataclass
class MixtureConfig:
    name: str = "mixture"
    seed: int = 1234
    sources: list[SourceConfig] = field(default_factory=list)
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def weights(self) -> dict[str, float]:
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stage_settings(self) -> dict[str, Any]:
        """What each stage's output depends on (its own settings plus the previous stage's key); mixture
        weights, the loader and Ray settings change no stage (mixing happens at load time)."""
        d = self.to_dict()
        sources = [{k: v for k, v in src.items() if k != "weight"} for src in d["sources"]]
        return {"docs": {"sources": sources, "clean": d["clean"], "layout": SHARD_LAYOUT_VERSION,
                         **{k: d[k] for k in ("filters", "decontam") if k in d}},
                "dedup": {k: v for k, v in d["dedup"].items() if k not in DEDUP_PARALLELISM},
                "tokenizer": {"tokenizer": d["tokenizer"], "split": d["split"]},
                "pack": d["pack"]}

    def fingerprint(self) -> str:
        """Hash of everything that changes the written shards (not the weights, loader or Ray settings)."""
        return settings_key(self.stage_settings())


def settings_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise DataConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
            raise DataConfigError(f"{where}: unknown key '{key}'{hint}")
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise DataConfigError(f"{where}: expected a list")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise DataConfigError(f"{where}: expected a mapping")
        return {_convert(args[0], k, where): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, str) and value.isdigit():
        return int(value)
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise DataConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def mixture_from_dict(data: dict[str, Any], where: str = "<mixture>",
                      base_dir: Path | None = None) -> MixtureConfig:
    cfg = _build(MixtureConfig, data, where)
    if not cfg.sources:
        raise DataConfigError(f"{where}: 'sources' is empty; list at least one source with a name and input")
    seen = set()
    for i, src in enumerate(cfg.sources):
        w = f"{where}.sources[{i}]"
        if not src.name or not src.name.replace("_", "").replace("-", "").isalnum():
            raise DataConfigError(f"{w}: name must be a non-empty identifier (letters, digits, _ or -)")
        if src.name in seen:
            raise DataConfigError(f"{w}: duplicate source name '{src.name}'")
        seen.add(src.name)
        if src.weight <= 0:
            raise DataConfigError(f"{w}: weight must be > 0, got {src.weight}")
        if src.input.kind not in INPUT_KINDS:
            raise DataConfigError(f"{w}.input.kind: '{src.input.kind}' is not one of {INPUT_KINDS}")
        if not src.input.path:
            raise DataConfigError(f"{w}.input.path: empty; give a file, directory, glob or embedded name")
        if (base_dir is not None and src.input.kind != "embedded" and not src.input.path.startswith("/")
                and "://" not in src.input.path):
            src.input.path = str((base_dir / src.input.path).resolve())
    return cfg


def load_mixture(path: str | Path) -> MixtureConfig:
    """Read a mixture YAML. Relative input paths are resolved against the current directory."""
    path = Path(path)
    if not path.is_file():
        raise DataConfigError(f"{path}: mixture file not found (see data_pipeline/configs/default_mixture.yaml)")
    data = yaml.safe_load(path.read_text()) or {}
    return mixture_from_dict(data, str(path), base_dir=Path.cwd())
