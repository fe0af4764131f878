"""Typed configuration: dataclasses loaded from YAML, with ``section.key=value`` overrides.

A config file lives in ``pretrain/configs/NAME.yaml`` (or is given as a path). It may start with
``base: OTHER`` to inherit another config and override some keys. Unknown keys and values of the wrong
type are rejected with an error that names the file, the key and the closest valid key.

The section and key names below are an interface other tools use (launch scripts, the cluster templates,
the dry-run); keep them stable: ``parallel.tp|pp|vpp|ep|etp|sp``, ``train.steps|seed|global_batch|
micro_batch|seq_len``, ``checkpoint.interval``, ``run.dir``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

LayerType = Literal["sliding", "csa", "hca"]
RECOMPUTE_MODES = ("none", "selective", "full")


def check_recompute_mode(mode: str, where: str = "model.recompute") -> str:
    """``mode`` if it is one of RECOMPUTE_MODES (pretrain.model.recompute), else a ValueError naming it."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"{where}={mode!r} is not one of {list(RECOMPUTE_MODES)}")
    return mode


class ConfigError(ValueError):
    """A configuration problem; the message names the file/key and the fix."""


@dataclass
class YarnConfig:
    """YaRN frequency interpolation for the CSA/HCA layers (docs/MODEL.md §11)."""

    enabled: bool = True
    factor: float = 16.0
    original_max_position: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass
class ModelConfig:
    """DeepSeek-V4 architecture. Field names follow HF ``DeepseekV4Config`` where one exists.

    Also how the model runs without changing its math: ``ops_backend`` and activation recomputation
    ``recompute`` = none | selective | full (``pretrain.model.recompute`` says what each keeps; the dry run,
    ``pretrain.dry_run``, shows the memory), ``recompute_num_layers`` = N > 0 applies it to the first N blocks of
    every pipeline chunk only (megatron's ``recompute_method=block``; the MTP block then keeps everything).
    """

    vocab_size: int = 129280
    hidden_size: int = 4096  # d
    num_layers: int = 43  # L (main stack)
    num_heads: int = 64  # n_h
    head_dim: int = 512  # c (q and the single shared K=V head)
    rope_head_dim: int = 64  # RoPE on the last rope_head_dim dims of every head
    q_lora_rank: int = 1024  # d_c
    o_groups: int = 8  # g
    o_lora_rank: int = 1024  # d_g
    sliding_window: int = 128  # n_win
    compress_rate_csa: int = 4  # m
    compress_rate_hca: int = 128  # m'
    index_n_heads: int = 64  # n_h^I
    index_head_dim: int = 128  # c^I
    index_topk: int = 512  # k
    layer_types: list[LayerType] = field(default_factory=list)  # len == num_layers
    mtp_layer_type: LayerType = "sliding"
    n_routed_experts: int = 256  # N_r
    n_shared_experts: int = 1  # N_s
    num_experts_per_tok: int = 6  # K_r
    moe_intermediate_size: int = 2048
    n_hash_layers: int = 3  # first layers routed by the token->experts table
    hash_seed: int = 0  # seed of the tid2eid table (the paper's hash is UNKNOWN)
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4  # n_hc mHC streams
    hc_sinkhorn_iters: int = 20  # t_max
    hc_eps: float = 1e-6
    hc_init_gating: float = 0.01  # initial alpha of the mHC gates (MLM's choice; paper UNKNOWN)
    rms_norm_eps: float = 1e-6
    num_mtp_layers: int = 1  # D
    rope_theta: float = 10000.0  # sliding-only layers
    compress_rope_theta: float = 160000.0  # CSA/HCA layers
    yarn: YarnConfig = field(default_factory=YarnConfig)
    max_position_embeddings: int = 1048576
    init_std: float = 0.02
    attention_mode: Literal["dense", "indexer_warmup", "sparse"] = "sparse"
    indexer_loss_coeff: float = 0.01
    ops_backend: Literal["auto", "reference", "blocked", "triton"] = "auto"
    # activation recomputation (pretrain.model.recompute): what the blocks keep for backward; the math is unchanged
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_num_layers: int = 0  # > 0: only the first N blocks of every pipeline chunk; 0 = all

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = default_layer_types(self.num_layers)
        check_recompute_mode(self.recompute)  # YAML values are checked by the Literal; this is for code
        if self.recompute_num_layers < 0:
            raise ValueError(f"model.recompute_num_layers={self.recompute_num_layers} must be >= 0 (0 = every block)")


def default_layer_types(num_layers: int) -> list[str]:
    """Flash's pattern: 2 sliding-only layers, then CSA/HCA alternating starting with CSA (§8)."""
    head = ["sliding", "sliding"][:num_layers]
    rest = ["csa" if i % 2 == 0 else "hca" for i in range(max(0, num_layers - 2))]
    return head + rest


@dataclass
class ParallelConfig:
    """Layout. Data-parallel size is derived: world / (tp * pp * sp); expert-DP from ep * etp."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B)
    ep: int = 1
    etp: int = 1
    sp: int = 1  # Ulysses sequence-parallel degree
    pp_layer_split: list[int] = field(default_factory=list)  # layers per stage; empty = even
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_minutes: int = 30


@dataclass
class TrainConfig:
    """The run: batch, schedules (pretrain.schedules), precision and guards (pretrain.guards).

    ``precision``: auto = bf16 autocast with fp32 master weights on GPU, fp32 on CPU. Guards: a step with a
    non-finite loss or gradient norm is skipped (``max_consecutive_skips`` in a row abort); with
    ``spike_threshold`` > 0 a loss above threshold x the mean of the last ``spike_window`` steps rolls back to
    the last checkpoint (``max_rollbacks`` per process). ``fault_inject_nan_steps`` (1-based steps) poisons
    the loss and gradients at those steps: a test hook for the guard, empty in real runs;
    ``fault_inject_pause_step`` makes every rank stop right after that step's metrics line and wait to be
    killed (the resume tests ``kill -9`` the process group there, deterministically mid-run), 0 in real runs.

    Validation (``pretrain.evaluate``): every ``eval_interval`` steps and at the last step (0 = off), the LM
    loss over the first ``eval_samples`` samples of each source's held-out split (the same samples every
    time; the dataset's ``validation`` split), as ``val_loss`` and ``val_loss/<source>`` in the metrics.
    Forward only: training is unchanged by it (bit-identical losses with it on or off).
    """

    steps: int = 1000
    global_batch: int = 8  # sequences per optimizer step
    micro_batch: int = 1  # sequences per forward pass per data-parallel rank
    seq_len: int = 256
    seed: int = 1234
    lr: float = 2.7e-4
    min_lr_ratio: float = 0.1  # cosine decay to min_lr_ratio * lr
    warmup_steps: int = 2000
    decay_start: float = 0.8  # fraction of steps after which cosine decay starts
    batch_ramp_steps: int = 0  # linear ramp of the global batch from batch_ramp_start
    batch_ramp_start: int = 0
    seq_len_stages: list[list[int]] = field(default_factory=list)  # [[start_step, seq_len], ...]
    yarn_stages: list[list[float]] = field(default_factory=list)  # [[start_step, YaRN factor], ...] (<= 1: off)
    dense_attention_steps: int = 0  # attention_mode=dense before this step
    indexer_warmup_steps: int = 0  # then indexer warm-up (frozen LM, KL loss) for this many
    mtp_lambda: float = 0.3
    mtp_lambda_decay: float = 0.1  # lambda from the start of LR decay
    bias_update_rate: float = 0.001  # gamma of the aux-loss-free expert bias
    seq_aux_loss_coeff: float = 0.0001  # alpha of the sequence-wise balance loss
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    spike_threshold: float = 0.0  # >0: loss > threshold * running mean rolls back
    spike_window: int = 20  # accepted steps in the running mean of the spike detector
    max_rollbacks: int = 3  # spike rollbacks allowed per process
    max_consecutive_skips: int = 10  # non-finite steps in a row before the run aborts
    fault_inject_nan_steps: list[int] = field(default_factory=list)  # testing: NaN loss at these steps
    fault_inject_pause_step: int = 0  # testing: every rank stops after this step, to be killed (0 = off)
    log_interval: int = 1
    deterministic: bool = True
    eval_interval: int = 0  # validation every N steps and at the last step (0 = off)
    eval_samples: int = 16  # held-out samples per source per evaluation


@dataclass
class OptimConfig:
    """Muon + AdamW (``parallel.optimizer_groups``). ``shard_adamw``: ZeRO-1 AdamW
    (``parallel.zero_adamw``): each data-parallel rank keeps the AdamW moments of its share of the AdamW
    parameters (bit-identical updates; checkpoints load either way). On by default (Flash/Pro need the
    memory, see the dry run); it only acts with more than one data-parallel rank (``make pretrain``'s two
    ranks are dp=2 for the dense parameters, so the main job runs it)."""

    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_update_rms: float = 0.18
    muon_ns_steps: list[list[float]] = field(
        default_factory=lambda: [[8, 3.4445, -4.7750, 2.0315], [2, 2.0, -1.5, 0.5]]
    )
    muon_tp_mode: Literal["auto", "gather", "gram"] = "auto"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-20
    fp32_newton_schulz: bool = False  # exactness path; bf16 matmuls otherwise on GPU
    shard_adamw: bool = True  # AdamW state sharded over data parallel (ZeRO-1)


@dataclass
class DataConfig:
    """Where the training data comes from and how it is read.

    Either ``dataset``: an already built dataset, a local directory or an object-store URL (``s3://bucket/ds``,
    configured by the AWS_* variables incl. AWS_ENDPOINT_URL), manifest at ``<dataset>/manifest.json``; the run
    trains from it as it is (its seq_len must be ``train.seq_len``; mixture weights from its manifest) and never
    builds. Or (``dataset`` empty) the pipeline builds ``mixture`` once under ``shards_dir``
    (``data_pipeline.api.ensure_dataset``). ``cache_dir``: node-local cache of remote shards, at most
    ``cache_limit_gb`` (LRU eviction of whole shards; shared safely by the ranks of a node); empty = remote
    shards are read into memory. ``prefetch``: micro-batches a background thread reads ahead (0 = off; the
    batches and the resume position are the same either way). ``num_workers`` is unused (kept for old configs)."""

    mixture: str = "data_pipeline/configs/default_mixture.yaml"
    shards_dir: str = "runs/data"  # where the pipeline writes MDS shards + manifest
    tokenizer: str = ""  # path to tokenizer.json; empty = trained by the pipeline
    vocab_size: int = 4096  # for a trained tokenizer
    num_workers: int = 0  # unused; see prefetch
    build_if_missing: bool = True
    dataset: str = ""  # built dataset (dir or s3://...) to train from; "" = build the mixture
    cache_dir: str = ""  # local cache of remote shards ("" = read into memory)
    cache_limit_gb: float = 50.0  # size limit of cache_dir (GiB)
    prefetch: int = 4  # micro-batches read ahead in a background thread (0 = off)

    def __post_init__(self) -> None:
        if self.prefetch < 0:
            raise ValueError(f"data.prefetch={self.prefetch} must be >= 0 (0 = no read-ahead)")
        if self.cache_limit_gb <= 0:
            raise ValueError(f"data.cache_limit_gb={self.cache_limit_gb} must be > 0")


@dataclass
class CheckpointConfig:
    """pretrain.checkpoint: every ``interval`` steps (0 = only at preemption) and at the end, under
    ``<run.dir>/checkpoints``; keep the last ``keep_last`` plus every ``keep_every``-th; ``async_save`` on GPU.
    ``load``: a checkpoint (``step_*`` dir or a run's ``checkpoints`` dir) to start a fresh run.dir from."""

    interval: int = 100
    keep_last: int = 2
    keep_every: int = 0  # also keep every N-th step (0 = off)
    async_save: bool = True  # GPU only
    load: str = ""  # explicit checkpoint to start from (else run.dir/latest)


@dataclass
class RunConfig:
    """Outputs under ``dir`` (metrics.jsonl, tensorboard/, loss.png, checkpoints/, config.yaml); rerunning with
    the same ``dir`` resumes. ``preempt_exit_code``: exit status after a SIGTERM/SIGUSR1 checkpoint."""

    dir: str = "runs/default"
    name: str = ""
    tensorboard: bool = True
    plot: bool = True
    progress: bool = True
    preempt_exit_code: int = 75  # exit status after a SIGTERM/SIGUSR1 checkpoint (EX_TEMPFAIL)
    peak_tflops: float = 0.0  # per-rank peak for the MFU estimate; 0 = auto (GPU table/CPU probe)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = args or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"{where}: unknown key '{key}' in section '{where.split(':')[-1]}'; {_suggest(key, names)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = CONFIG_DIR / f"{name}.yaml"
    if cand.exists():
        return cand
    known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"config '{name}' not found (looked for {p} and {cand}); {hint}available: {', '.join(known)}")


def load_raw(name: str, _seen: Optional[set] = None) -> tuple[dict[str, Any], Path]:
    path = resolve_config_path(name)
    _seen = _seen or set()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' inheritance cycle")
    _seen.add(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}); fix the syntax at the position shown") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        base_data, _ = load_raw(str(base), _seen)
        data = _merge(base_data, data)
    return data, path


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.steps=10)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{text}': key must be section.key (e.g. parallel.tp=2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = _merge({}, data)
    for ov in overrides:
        parts, value = parse_override(ov)
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{ov}': '{p}' is not a section")
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any], where: str = "config") -> Config:
    names = [f.name for f in dataclasses.fields(Config)]
    for k in data:
        if k not in names:
            raise ConfigError(f"{where}: unknown section '{k}'; {_suggest(k, names)}")
    return _build(Config, data, where)


def load_config(name: str, overrides: Optional[list[str]] = None) -> Config:
    """Load ``pretrain/configs/NAME.yaml`` (or a path), apply ``section.key=value`` overrides, validate."""
    data, path = load_raw(name)
    data = apply_overrides(data, list(overrides or []))
    cfg = config_from_dict(data, where=str(path))
    validate(cfg, where=str(path))
    return cfg


def validate(cfg: Config, where: str = "config") -> None:
    """Checks that need no process group (the layout is validated against the world size later)."""
    m = cfg.model
    if len(m.layer_types) != m.num_layers:
        raise ConfigError(
            f"{where}: model.layer_types has {len(m.layer_types)} entries but "
            f"model.num_layers={m.num_layers}; give one type per layer"
        )
    if m.rope_head_dim > m.head_dim or m.rope_head_dim % 2:
        raise ConfigError(f"{where}: model.rope_head_dim={m.rope_head_dim} must be even and <= head_dim={m.head_dim}")
    if m.num_heads % m.o_groups:
        raise ConfigError(f"{where}: model.num_heads={m.num_heads} not divisible by model.o_groups={m.o_groups}")
    if m.num_experts_per_tok > m.n_routed_experts:
        raise ConfigError(
            f"{where}: model.num_experts_per_tok={m.num_experts_per_tok} > n_routed_experts={m.n_routed_experts}"
        )
    if m.n_hash_layers > m.num_layers:
        raise ConfigError(f"{where}: model.n_hash_layers={m.n_hash_layers} > num_layers={m.num_layers}")
    t = cfg.train
    if t.global_batch % t.micro_batch:
        raise ConfigError(
            f"{where}: train.global_batch={t.global_batch} not divisible by train.micro_batch={t.micro_batch}"
        )
    for k in ("steps", "global_batch", "micro_batch", "seq_len"):
        if getattr(t, k) <= 0:
            raise ConfigError(f"{where}: train.{k} must be positive, got {getattr(t, k)}")
    if t.eval_interval < 0:
        raise ConfigError(f"{where}: train.eval_interval={t.eval_interval} must be >= 0 (0 turns validation off)")
    if t.eval_interval > 0 and t.eval_samples <= 0:
        raise ConfigError(
            f"{where}: train.eval_samples={t.eval_samples} must be positive when "
            f"train.eval_interval > 0 (held-out samples per source per evaluation)"
        )
    p = cfg.parallel
    for k in ("tp", "pp", "vpp", "ep", "etp", "sp"):
        if getattr(p, k) < 1:
            raise ConfigError(f"{where}: parallel.{k} must be >= 1, got {getattr(p, k)}")
    if cfg.checkpoint.interval < 0:
        raise ConfigError(f"{where}: checkpoint.interval must be >= 0")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
