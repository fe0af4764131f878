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
import types
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
DEDUP_PARALLELISM = (
    "band_ranges",
    "exact_ranges",
    "cc_partitions",
    "cc_single_task_edges",
    "max_cc_rounds",
    "partitions_per_collect",
)


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
    id_field: str = "id"  # kept as the document id when present, else ``source/file:line``
    # extra input fields carried through ingest as per-document metadata (e.g. url, date, domain), for the
    # metadata filters and the report; a record that lacks one gets an empty value
    metadata_fields: list[str] = field(default_factory=list)


@dataclass
class SourceConfig:
    name: str = ""
    weight: float = 1.0
    input: SourceInput = field(default_factory=SourceInput)
    languages: list[str] = field(default_factory=list)  # keep only these langid codes (e.g. [zh, en]); [] = all


# Korean words (eojeol) average ~2.8 characters and Vietnamese syllables ~3.5, at or under the Gopher
# minimum mean word length of 3; Dravidian words, with their vowel signs, run past 10 code points.
DEFAULT_BY_LANGUAGE: dict[str, dict[str, Any]] = {
    "ko": {"min_mean_word_len": 1.5},
    "vi": {"min_mean_word_len": 2.0},
    "ml": {"max_mean_word_len": 16.0},
    "ta": {"max_mean_word_len": 14.0},
    "te": {"max_mean_word_len": 14.0},
    "kn": {"max_mean_word_len": 14.0},
}


@dataclass
class CleanConfig:
    """Normalisation and Gopher/FineWeb-style quality filters; ``null`` disables a filter.

    Ratios follow Rae et al. 2021 (Gopher, App. A) and FineWeb's repetition rules.
    """

    enabled: bool = True
    unicode_form: str = "NFC"  # NFC | NFKC | none
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_len: float | None = 3.0
    max_mean_word_len: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # ('#' + '...' + '…') / words
    max_bullet_line_frac: float | None = 0.9
    max_ellipsis_line_frac: float | None = 0.3
    min_alpha_word_frac: float | None = 0.8  # words with at least one letter
    min_stop_words: int | None = 2  # of {the, be, to, of, and, that, have, with}
    max_dup_line_frac: float | None = 0.3
    max_dup_line_char_frac: float | None = 0.2
    max_top_ngram_char_frac: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_dup_ngram_char_frac: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    # language identification (data_pipeline.langid): needed by the stop-word lists and ``languages``
    langid: bool = True
    langid_sample_chars: int = 1000  # classify at most this many characters (start, middle, end)
    langid_min_chars: int = 20  # fewer letters than this: "und"
    langid_min_confidence: float = 0.5  # lower posterior than this: "und"
    # stop-word lists by language code, replacing the built-in ones (clean.STOP_WORDS); [] turns the rule off
    stop_words: dict[str, list[str]] = field(default_factory=dict)
    # scripts without spaces (zh, ja, th, ...): characters instead of words (see data_pipeline.clean)
    min_chars: int | None = 100
    max_chars: int | None = 300_000
    max_top_char_ngram_frac: dict[int, float] = field(default_factory=lambda: {4: 0.20, 6: 0.18, 8: 0.16})
    max_dup_char_ngram_frac: dict[int, float] = field(
        default_factory=lambda: {10: 0.15, 12: 0.14, 14: 0.13, 16: 0.12, 18: 0.11, 20: 0.10}
    )
    # per-language overrides of any threshold above, e.g. {de: {min_words: 40}}; merged over
    # DEFAULT_BY_LANGUAGE (a language's keys over its default keys), so setting one never drops the others
    by_language: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        merged = {lang: dict(over) for lang, over in DEFAULT_BY_LANGUAGE.items()}
        for lang, over in self.by_language.items():
            merged[lang] = {**merged.get(lang, {}), **over} if isinstance(over, dict) else over
        self.by_language = merged


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
    ngram: int = 5  # word n-grams for text written with spaces
    char_ngram: int = 5  # character n-grams for spaceless scripts (zh, ja, th...; see minhash.py)
    bands: int = 14
    rows: int = 8
    seed: int = 1
    band_ranges: int = 1  # tasks per band: each merges the keys of one hash range of the band
    exact_ranges: int = 0  # tasks of the exact reduce (content-hash ranges); 0 = bands * band_ranges
    cc_partitions: int = 0  # node-hash partitions of the distributed components; 0 = bands * band_ranges
    cc_single_task_edges: int = 20_000_000  # up to this many candidate edges: components in one task
    max_cc_rounds: int = 64  # large-star / small-star rounds before giving up
    partitions_per_collect: int = 64  # input partitions per task writing the removal lists


DECONTAM_MODES = ("remove", "tag")


@dataclass
class DecontamConfig:
    """N-gram overlap decontamination against evaluation sets (data_pipeline.decontam).

    A document is contaminated when at least ``min_matches`` of its distinct token n-grams occur in the
    evaluation texts (words; characters for spaceless scripts). ``mode``: ``remove`` drops it (reason
    ``decontam``), ``tag`` keeps it and marks it. Empty ``files`` = off.
    """

    files: list[str] = field(default_factory=list)  # JSONL (.jsonl[.gz|.zst]) or plain text; paths or URLs
    text_fields: list[str] = field(default_factory=lambda: ["text"])  # JSONL fields holding eval text
    ngram: int = 13  # GPT-3's 13-gram overlap
    char_ngram: int = 20  # ~13 words of Chinese/Japanese at 1.5 characters a word
    min_tokens: int = 8  # eval texts shorter than the n-gram but at least this long match whole
    min_matches: int = 1
    mode: str = "remove"


@dataclass
class MetadataFilterConfig:
    """Filters on the per-document metadata carried from the input (``SourceInput.metadata_fields``).

    ``blocklist`` entries (and lines of ``blocklist_files``; '#' starts a comment): ``example.com`` blocks
    that domain and all its subdomains (reason ``blocked_domain``); an entry with a path,
    ``example.com/ads/``, blocks the URLs under that prefix on that host (reason ``blocked_url``).
    """

    url_field: str = "url"
    domain_field: str = ""  # a metadata field holding the domain; "" = the host of url_field
    blocklist: list[str] = field(default_factory=list)
    blocklist_files: list[str] = field(default_factory=list)  # local paths or URLs (data_pipeline.storage)
    date_field: str = "date"
    min_date: str = ""  # ISO dates (YYYY-MM-DD...): keep min_date <= date < max_date; "" = open
    max_date: str = ""
    required_fields: list[str] = field(default_factory=list)  # empty or absent: reason missing_metadata


@dataclass
class TokenizerConfig:
    path: str = ""  # an existing tokenizer.json; empty = train a byte-level BPE
    vocab_size: int = 4096
    sample_bytes: int = 16_000_000  # training sample, drawn across sources in proportion to their size
    min_frequency: int = 2
    bos: str = "<|bos|>"
    eos: str = "<|eos|>"
    pad: str = "<|pad|>"


@dataclass
class PackConfig:
    seq_len: int = 128  # samples hold seq_len + 1 tokens
    add_bos: bool = False  # documents are separated by EOS; BOS optional
    shard_size_limit: int = 1 << 24
    compression: str = "zstd"
    part_tokens: int = 1 << 27  # tokens per pack task / MDS part (consecutive input files of one source;
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

    period: int = 10_000  # interleave period: weights are quantised to 1/period
    shuffle_block: int = 4096  # samples permuted together (bounded shard cache)
    cache_shards: int = 16  # decompressed shards kept per source


@dataclass
class RayConfig:
    num_cpus: int = 0  # 0 = the machine's CPUs (local Ray only)
    object_store_mb: int = 300


@dataclass
class MixtureConfig:
    name: str = "mixture"
    seed: int = 1234
    sources: list[SourceConfig] = field(default_factory=list)
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    filters: MetadataFilterConfig = field(default_factory=MetadataFilterConfig)
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
        return {
            "docs": {
                "sources": sources,
                "clean": d["clean"],
                "layout": SHARD_LAYOUT_VERSION,
                **{k: d[k] for k in ("filters", "decontam") if k in d},
            },
            "dedup": {k: v for k, v in d["dedup"].items() if k not in DEDUP_PARALLELISM},
            "tokenizer": {"tokenizer": d["tokenizer"], "split": d["split"]},
            "pack": d["pack"],
        }

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
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] and X | None
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


def mixture_from_dict(data: dict[str, Any], where: str = "<mixture>", base_dir: Path | None = None) -> MixtureConfig:
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
        for j, code in enumerate(src.languages):
            if not (isinstance(code, str) and code.isalpha() and code.islower() and 2 <= len(code) <= 3):
                raise DataConfigError(
                    f"{w}.languages[{j}]: '{code}' is not a language code; use ISO 639-1 "
                    f"codes as data_pipeline.langid.detect returns them (en, de, zh, ...)"
                )
        if src.languages and not cfg.clean.langid:
            raise DataConfigError(f"{w}.languages: selecting languages needs clean.langid: true")
        if (
            base_dir is not None
            and src.input.kind != "embedded"
            and not src.input.path.startswith("/")
            and "://" not in src.input.path
        ):
            src.input.path = str((base_dir / src.input.path).resolve())
    _check_clean(cfg.clean, f"{where}.clean")
    _check_decontam(cfg.decontam, f"{where}.decontam")
    return cfg


def _check_clean(clean: CleanConfig, where: str) -> None:
    """``by_language`` overrides: known threshold names, typed like the field they override."""
    hints = typing.get_type_hints(CleanConfig)
    names = [f.name for f in dataclasses.fields(CleanConfig) if f.name not in _NOT_PER_LANGUAGE]
    for lang, over in clean.by_language.items():
        if not isinstance(over, dict):
            raise DataConfigError(f"{where}.by_language.{lang}: expected a mapping of thresholds")
        for key, value in over.items():
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
                raise DataConfigError(f"{where}.by_language.{lang}: unknown key '{key}'{hint}")
            over[key] = _convert(hints[key], value, f"{where}.by_language.{lang}.{key}")


_NOT_PER_LANGUAGE = (
    "enabled",
    "unicode_form",
    "langid",
    "langid_sample_chars",
    "langid_min_chars",
    "langid_min_confidence",
    "stop_words",
    "by_language",
)


def _check_decontam(dc: DecontamConfig, where: str) -> None:
    if dc.mode not in DECONTAM_MODES:
        raise DataConfigError(f"{where}.mode: '{dc.mode}' is not one of {DECONTAM_MODES}")
    for key in ("ngram", "char_ngram", "min_tokens", "min_matches"):
        if getattr(dc, key) < 1:
            raise DataConfigError(f"{where}.{key}: must be >= 1, got {getattr(dc, key)}")
    if not dc.text_fields:
        raise DataConfigError(f"{where}.text_fields: empty; name the JSONL field(s) with the evaluation text")


def load_mixture(path: str | Path) -> MixtureConfig:
    """Read a mixture YAML. Relative input paths are resolved against the current directory."""
    path = Path(path)
    if not path.is_file():
        raise DataConfigError(f"{path}: mixture file not found (see data_pipeline/configs/default_mixture.yaml)")
    data = yaml.safe_load(path.read_text()) or {}
    return mixture_from_dict(data, str(path), base_dir=Path.cwd())
