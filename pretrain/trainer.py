"""The DeepSeek-V4 pretraining loop (torchtitan-style: one object that owns the run).

One optimizer step (``Trainer.train_step``):

1. schedules for step s (``pretrain.schedules``): LR into both optimizers, attention mode into the model,
   MTP lambda, expert-bias rate, number of micro-batches (batch ramp), sequence length (stages).
2. this data-parallel rank's micro-batches through megatron's schedule (``parallel.pipeline.forward_backward``:
   1F1B / interleaved when pp > 1), under bf16 autocast on GPU (fp32 master weights) or fp32 on CPU; each
   micro-batch loss is divided by their number; the returned losses are global-batch means.
3. ``parallel.pipeline.finalize_grads``: megatron's ``finalize_model_grads`` (DDP reduction over data
   parallel, experts over expert-data parallel, scaled 1/dp), so the gradient is that of the mean loss over
   the global batch for any dp size; ``p.grad = main_grad``. The expert bias is not touched there.
4. guards: global gradient norm; non-finite loss or norm -> skip the step; else clip to ``train.grad_clip``,
   ``Muon.step()`` and ``AdamW.step()`` (indexer warm-up: weights outside the indexers are restored).
5. expert biases (``parallel.pipeline.update_expert_bias``): loads of the step summed over TP x DP (incl. EP),
   ``b += gamma sign(mean - load)`` once per optimizer step (rate 0 for a skipped step).
6. metrics line; checkpoint every ``checkpoint.interval``; spike rollback; preemption check.

Validation (``train.eval_interval`` > 0; ``pretrain.evaluate.Validator``): after every multiple of the interval
and after the last step, the LM loss over the fixed held-out samples, forward only through the same schedule
(no gradients; RNGs and every training state restored), into that step's metrics line as ``val_loss`` and
``val_loss/<source>``. The dataset manifests the run trained on are recorded in ``<run.dir>/dataset.json``
(for ``pretrain.evaluate`` and ``pretrain.generate``).

Resume: the same command with the same ``run.dir`` loads ``<run.dir>/checkpoints/latest`` (falling back to
older valid ones), or ``checkpoint.load`` for a fresh run.dir. Model, Muon and AdamW state, step, guard
state, every RNG (per rank) and the data-loader position are restored, so the losses continue bit-identically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from parallel import pipeline
from parallel.process_groups import global_rank as _rank
from pretrain import step_utils as su
from pretrain.checkpoint import CheckpointError, CheckpointManager
from pretrain.ckpt_state import build_state, load_state, rng_state, set_rng_state
from pretrain.config import Config, ConfigError, dump_config
from pretrain.guards import Guards
from pretrain.metrics import MetricsLogger, plot_losses
from pretrain.model.rope import set_yarn_factor
from pretrain.schedules import Schedules, StepSchedule
from pretrain.signals import PreemptionHandler

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    exit_code: int
    steps_done: int
    first_loss: float | None
    last_loss: float | None
    preempted: bool = False
    checkpoint: str | None = None
    first_val: dict[str, Any] | None = None  # the first / last validation of this run ({"step", "val_loss", ...})
    last_val: dict[str, Any] | None = None


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class Trainer:
    def __init__(self, cfg: Config, layout: Any) -> None:
        from megatron.core import parallel_state as ps

        self.cfg, self.layout = cfg, layout
        self.rank, self.world = _rank(), _world()
        t = cfg.train
        # the data-parallel slice of the global batch: Ulysses sp ranks (megatron's context-parallel slot) read
        # the same rows and each keeps its sequence shard (parallel.pipeline.PipelineStage.forward)
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp = ps.get_data_parallel_world_size()
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        want = t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        if want == "bf16" and self.device.type != "cuda":
            log.warning("train.precision=bf16 on CPU: using fp32 (bf16 autocast is for GPUs)")
            want = "fp32"
        self.precision = want
        from ops import dispatch

        dispatch.set_backend(cfg.model.ops_backend)
        if want == "bf16":
            su.router_autocast_safe()
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.run_dir = Path(cfg.run.dir)
        try:
            self.sched = Schedules(t, dp=self.dp, default_attention_mode=cfg.model.attention_mode)
        except ValueError as e:
            raise ConfigError(f"{e} (data-parallel size {self.dp} from world {self.world})") from e
        self._validate_batches()
        self.guards = Guards(t.spike_threshold, t.spike_window, t.max_consecutive_skips, t.max_rollbacks)
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_every, cfg.checkpoint.async_save
        )
        self.metrics = MetricsLogger(
            self.run_dir, self.rank == 0, t.steps, cfg.run.tensorboard, cfg.run.progress, t.log_interval
        )
        self.preempt = PreemptionHandler()
        self.step = 0  # optimizer steps completed
        self.tokens_total = 0
        self._build_model()
        self._build_optimizers()
        self.loader = None
        self.loader_stage = -1
        self.manifest: dict[int, Any] = {}
        self.peak = su.peak_flops(cfg.run.peak_tflops)
        self.flops_per_token = 6.0 * su.activated_params(
            [p for m in self.modules for p in m.parameters()], cfg.model.n_routed_experts, cfg.model.num_experts_per_tok
        )
        self.validator = None
        if t.eval_interval > 0:
            from pretrain.evaluate import Validator

            self.validator = Validator(self.chunks, t.micro_batch, t.eval_samples, self.device, self._autocast)
        self._recorded_manifests = 0

    # ------------------------------------------------------------------------------------------ build
    def _validate_batches(self) -> None:
        """``train.global_batch`` at every sequence length fits the layout (micro-batches per rank a multiple of
        pp under vpp; seq_len divisible by sp·tp): fail before the model is built, naming the numbers."""
        from parallel.process_groups import validate_batch

        t = self.cfg.train
        for seq_len in sorted({t.seq_len} | {sl for _, sl in self.sched.stages}):
            validate_batch(self.layout, t.global_batch, t.micro_batch, seq_len)

    def _seed_all(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build_model(self) -> None:
        from megatron.core import tensor_parallel

        from pretrain.model.build import build_model

        t = self.cfg.train
        self._seed_all(t.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(t.seed)
        # one DDP-wrapped chunk per virtual pipeline stage, initialised layout-independently from the seed
        self.chunks = build_model(
            self.cfg.model,
            seed=t.seed,
            pp_layer_split=self.cfg.parallel.pp_layer_split,
            balance_loss_coeff=t.seq_aux_loss_coeff,
            bias_update_rate=t.bias_update_rate,
            params_dtype=torch.float32,
        )
        self.modules = [pipeline.unwrap(c).module for c in self.chunks]
        self.params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        # per-rank streams for anything stochastic after init (the data order comes from the loader)
        self._seed_all(t.seed + 1000003 * (self.rank + 1))
        n = sum(p.numel() for m in self.modules for p in m.parameters())
        log.info("model: %.2fM parameters on this rank, precision %s, layout %s", n / 1e6, self.precision, self.layout)

    def _build_optimizers(self) -> None:
        from parallel.optimizer_groups import build_optimizers

        groups = "parallel_state" if self.world > 1 else None
        named = [(n, p) for m in self.modules for n, p in m.named_parameters()]
        muon, adamw = build_optimizers(named, self.cfg.optim, self.cfg.train.lr, groups=groups)
        self.optimizers = {k: v for k, v in (("muon", muon), ("adamw", adamw)) if v is not None}

    # ------------------------------------------------------------------------------------------ data
    def _loader_for(self, sched: StepSchedule, state: dict[str, Any] | None = None) -> None:
        """(Re)build the data loader when the sequence-length stage changes (or on resume)."""
        if self.loader is not None and self.loader_stage == sched.seq_stage and state is None:
            return
        from data_pipeline.api import build_loader, ensure_dataset

        d = self.cfg.data
        if d.dataset:  # an already built dataset (local or s3://...): read as it is, never built
            self.manifest.setdefault(sched.seq_len, d.dataset)
        if sched.seq_len not in self.manifest:
            if not d.build_if_missing:
                raise ConfigError(
                    f"data.build_if_missing=false and no dataset check was requested for "
                    f"{d.shards_dir}; enable it or build the shards with the data pipeline"
                )
            # rank 0 builds (or finds) the shards first; the others then only read the cached manifest
            if self.rank != 0:
                dist.barrier()
            manifest = ensure_dataset(d.shards_dir, d.mixture, d.vocab_size, sched.seq_len)
            if self.rank == 0 and dist.is_initialized():
                dist.barrier()
            self.manifest[sched.seq_len] = manifest
        t = self.cfg.train
        if self.loader is not None:
            self.loader.close()  # its read-ahead thread
        try:
            self.loader = build_loader(
                self.manifest[sched.seq_len],
                None if d.dataset else d.mixture,
                sched.seq_len,
                t.global_batch,
                t.micro_batch,
                self.dp_rank,
                self.dp,
                t.seed + sched.seq_stage,
                prefetch=d.prefetch,
                cache_dir=d.cache_dir or None,
                cache_limit_bytes=int(d.cache_limit_gb * 2**30),
            )
        except ValueError as e:
            if not d.dataset:
                raise
            raise ConfigError(f"data.dataset={d.dataset}: {e}") from e
        if d.dataset:
            vocab = self.loader.vocab_size
            if vocab > self.cfg.model.vocab_size:
                raise ConfigError(
                    f"data.dataset={d.dataset} has token ids up to vocabulary {vocab} > model.vocab_size "
                    f"{self.cfg.model.vocab_size}; set model.vocab_size={vocab} or use a dataset built for "
                    "this vocabulary"
                )
        if state is not None:
            self.loader.load_state_dict(state)
        self._it = iter(self.loader)
        self.loader_stage = sched.seq_stage

    def _next_batch(self) -> dict[str, torch.Tensor]:
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)  # a finite loader: next epoch
            return next(self._it)

    # ------------------------------------------------------------------------------------------ ckpt
    def _rank_objects(self) -> dict[str, Any]:
        return {
            "rng": rng_state(),
            "loader": self.loader.state_dict() if self.loader is not None else None,
            "loader_stage": self.loader_stage,
        }

    def save_checkpoint(self) -> str | None:
        common = {
            "step": self.step,
            "tokens_total": self.tokens_total,
            "guards": self.guards.state_dict(),
            "schedules": self.sched.state_dict(),
            "config": self.cfg.to_dict(),
            "layout": {k: getattr(self.layout, k) for k in ("tp", "pp", "ep", "etp", "sp", "dp")},
        }
        sd = build_state(self.chunks, self.optimizers, common, self._rank_objects(), self.rank, self.world)
        meta = {"step": self.step, "world": self.world, "layout": common["layout"], "tokens": self.tokens_total}
        self.ckpt.save(self.step, sd, meta)
        return str(self.ckpt.root / f"step_{self.step:08d}")

    def _resume_path(self) -> Path | None:
        path = self.ckpt.find_latest_valid()
        if path is None and self.cfg.checkpoint.load:
            p = Path(self.cfg.checkpoint.load)
            if (p / "latest").exists() or p.name == "checkpoints":
                path = CheckpointManager(p).find_latest_valid()
            elif p.is_dir():
                path = p
            if path is None:
                raise CheckpointError(
                    f"checkpoint.load={p}: no valid checkpoint there; give a step_* "
                    f"directory or a run's checkpoints directory"
                )
        return path

    def load_checkpoint(self, path: Path, keep_loader: bool = False) -> None:
        t0 = time.monotonic()
        common, objs, same_world = load_state(path, self.chunks, self.optimizers, self.rank, self.world)
        self.step = int(common["step"])
        self.ckpt.last_saved_step = self.step  # nothing new to save until the next step
        self.tokens_total = int(common.get("tokens_total", 0))
        self.guards.load_state_dict(common.get("guards", {}))
        changed = self.sched.changed_keys(common.get("schedules", {}))
        if changed:
            log.warning(
                "resuming with a changed schedule (%s); the new values apply from step %d",
                ", ".join(changed),
                self.step + 1,
            )
        if same_world:
            set_rng_state(objs["rng"])
        else:
            log.warning(
                "checkpoint %s was written by %s ranks, this run has %d: model and optimizer state "
                "resharded; RNGs reseeded; data position taken from old rank 0",
                path,
                common.get("world"),
                self.world,
            )
            self._seed_all(self.cfg.train.seed + 7919 * (self.step + 1) + 1000003 * (self.rank + 1))
        if not keep_loader:
            sched = self.sched.at(self.step)
            state = objs.get("loader") if objs.get("loader_stage") == sched.seq_stage else None
            self.loader = None
            self._loader_for(sched, state)
        log.info("resumed from %s at step %d (%.1f s)", path, self.step, time.monotonic() - t0)

    # ------------------------------------------------------------------------------------------ step
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, sched: StepSchedule) -> dict[str, Any]:
        t = self.cfg.train
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = sched.lr
        for m in self.modules:
            su.set_attention_mode(m, sched.attention_mode)
            set_yarn_factor(m, sched.yarn_factor)  # YaRN stage (train.yarn_stages)
        pipeline.zero_grads(self.chunks)
        micro = [su.split_batch(self._next_batch(), self.device) for _ in range(sched.micro_batches)]
        with self._autocast():
            losses = pipeline.forward_backward(self.chunks, micro, mtp_lambda=sched.mtp_lambda)
        pipeline.finalize_grads(self.chunks)
        if (self.step + 1) in set(t.fault_inject_nan_steps):  # testing the guard: poison loss and grads
            losses["loss"] = float("nan")
            self.params[0].grad.fill_(float("nan"))
        gnorm = su.grad_norm(self.params)
        skipped = self.guards.check_nonfinite(losses["loss"], gnorm, self.step + 1)
        if skipped:
            log.warning(
                "step %d: non-finite loss %s / grad norm %s: step skipped (%d so far)",
                self.step + 1,
                losses["loss"],
                gnorm,
                self.guards.skipped_total,
            )
        else:
            su.clip_(self.params, gnorm, t.grad_clip)
            frozen = (
                [p for m in self.modules for p in su.frozen_for_indexer_warmup(m)]
                if sched.attention_mode == "indexer_warmup"
                else []
            )
            saved = [p.detach().clone() for p in frozen]
            for opt in self.optimizers.values():
                opt.step()
            with torch.no_grad():
                for p, s in zip(frozen, saved):  # main model frozen during the indexer warm-up
                    p.copy_(s)
        loads = pipeline.update_expert_bias(self.chunks, 0.0 if skipped else sched.bias_update_rate)
        for p in self.params:
            p.grad = None
        rec = {
            **losses,
            "lr": sched.lr,
            "grad_norm": gnorm if math.isfinite(gnorm) else None,
            "skipped": skipped,
            "skipped_total": self.guards.skipped_total,
        }
        rec.update(su.load_stats(loads))
        return rec

    # ------------------------------------------------------------------------------------------ validation
    def _record_dataset(self) -> None:
        """``<run.dir>/dataset.json``: the manifest of each sequence length trained so far (rank 0)."""
        self._recorded_manifests = len(self.manifest)
        if self.rank == 0:
            rec = {"manifests": {str(k): str(Path(v).resolve()) for k, v in sorted(self.manifest.items())}}
            (self.run_dir / "dataset.json").write_text(json.dumps(rec, indent=1) + "\n")

    def _validation(self, sched: StepSchedule, prepare_only: bool = False) -> dict[str, float]:
        """The validation losses at the current weights (collective); ``prepare_only`` reads the held-out
        samples (fails fast on a dataset without a validation split) and evaluates nothing."""
        from data_pipeline.manifest import ManifestError

        manifest = self.manifest[sched.seq_len]
        t0 = time.monotonic()
        try:
            self.validator.batches(manifest, sched.seq_len)  # read once, then cached
        except (ManifestError, ValueError) as e:
            raise ConfigError(
                f"train.eval_interval={self.cfg.train.eval_interval}: {e}; or set "
                f"train.eval_interval=0 to train without validation"
            ) from e
        if prepare_only:
            return {}
        rec = self.validator.losses(manifest, sched.seq_len)
        rec["val_time_s"] = time.monotonic() - t0
        return rec

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        self.preempt.install()
        path = self._resume_path()
        if path is not None:
            self.load_checkpoint(path)
        else:
            self._loader_for(self.sched.at(0))
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            (self.run_dir / "preempted.json").unlink(missing_ok=True)
        self._record_dataset()
        if self.validator is not None:
            self._validation(self.sched.at(self.step), prepare_only=True)
        self.metrics.open(self.step)
        first = last = None
        first_val = last_val = None
        start_step = self.step
        t_run = time.monotonic()
        exit_code, preempted = 0, False
        try:
            while self.step < t.steps:
                sched = self.sched.at(self.step)
                self._loader_for(sched)
                t0 = time.monotonic()
                rec = self.train_step(sched)
                dt = time.monotonic() - t0
                if len(self.manifest) != self._recorded_manifests:
                    self._record_dataset()
                self.step += 1
                ntok = sched.global_batch * sched.seq_len
                self.tokens_total += ntok
                if not rec["skipped"] and self.guards.is_spike(rec["loss"]) and self._rollback(rec["loss"]):
                    continue
                done = self.step - start_step
                eta = (time.monotonic() - t_run) / done * (t.steps - self.step)
                rec = {
                    "step": self.step,
                    **rec,
                    "tokens": ntok,
                    "tokens_total": self.tokens_total,
                    "tokens_per_s": ntok / dt,
                    "step_time_s": dt,
                    "mfu": self.flops_per_token * ntok / dt / (self.peak * self.world),
                    "eta_s": eta,
                    "global_batch": sched.global_batch,
                    "seq_len": sched.seq_len,
                    "attention_mode": sched.attention_mode,
                    "mtp_lambda": sched.mtp_lambda,
                    "bias_update_rate": sched.bias_update_rate,
                    "rollback": False,
                    "time": time.time(),
                }
                if self.validator is not None and self.validator.due(self.step, t.eval_interval, t.steps):
                    val = self._validation(sched)
                    rec.update(val)
                    first_val = first_val or {"step": self.step, **val}
                    last_val = {"step": self.step, **val}
                self.metrics.log(rec)
                first = rec["loss"] if first is None else first
                last = rec["loss"]
                self.ckpt.poll()
                interval = cfg.checkpoint.interval
                if interval > 0 and self.step % interval == 0 and self.step < t.steps:
                    self.save_checkpoint()
                if t.fault_inject_pause_step == self.step:
                    log.warning("train.fault_inject_pause_step=%d: waiting to be killed", self.step)
                    while True:
                        time.sleep(1)
                if self.preempt.requested():
                    preempted = True
                    break
            if self.ckpt.last_saved_step != self.step and (cfg.checkpoint.interval > 0 or preempted):
                self.save_checkpoint()
            self.ckpt.wait()
            if preempted:
                exit_code = cfg.run.preempt_exit_code
                if self.rank == 0:
                    (self.run_dir / "preempted.json").write_text(
                        json.dumps(
                            {
                                "step": self.step,
                                "signal": self.preempt.signum,
                                "exit_code": exit_code,
                                "time": time.time(),
                            }
                        )
                    )
                log.warning(
                    "preempted: checkpoint at step %d written; exiting with %d for requeue", self.step, exit_code
                )
        finally:
            self.ckpt.close()
            self.metrics.close()
            self.preempt.restore()
        if self.rank == 0 and cfg.run.plot and not preempted:
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        ck = self.ckpt.read_latest()
        return RunResult(
            exit_code, self.step, first, last, preempted, str(self.ckpt.root / ck) if ck else None, first_val, last_val
        )

    def _rollback(self, loss: float) -> bool:
        path = self.ckpt.find_latest_valid()
        if path is None:
            log.warning("step %d: loss spike %.4f but no checkpoint to roll back to; continuing", self.step, loss)
            return False
        log.warning(
            "step %d: loss spike %.4f (> %.2f x running mean): rolling back to %s; the data loader "
            "keeps its position (the spike's batches are not replayed)",
            self.step,
            loss,
            self.cfg.train.spike_threshold,
            path,
        )
        self.load_checkpoint(path, keep_loader=True)
        if self.rank == 0:
            from pretrain.metrics import truncate_after

            self.metrics.close()
            truncate_after(self.run_dir / "metrics.jsonl", self.step)
            self.metrics.open(self.step)
        return True


def summary(cfg: Config, res: RunResult) -> str:
    rd = Path(cfg.run.dir).resolve()
    lines = [
        f"run dir      {rd}",
        f"steps        {res.steps_done}/{cfg.train.steps}"
        + ("  (PREEMPTED: rerun to resume)" if res.preempted else ""),
        f"loss         {res.first_loss:.4f} (first step of this run) -> {res.last_loss:.4f} (last)"
        if res.first_loss is not None
        else "loss         (no step run)",
        _val_line(res),
        f"metrics      {rd / 'metrics.jsonl'}",
        f"tensorboard  {rd / 'tensorboard'}" if cfg.run.tensorboard else "",
        f"loss plot    {rd / 'loss.png'}" if (rd / "loss.png").exists() else "",
        f"checkpoint   {Path(res.checkpoint).resolve()}" if res.checkpoint else "checkpoint   (none)",
    ]
    return "\n".join(x for x in lines if x)


def _val_line(res: RunResult) -> str:
    if not res.last_val:
        return ""
    from pretrain.evaluate import format_losses

    first = res.first_val
    head = (
        f"{first['val_loss']:.4f} (step {first['step']}) -> " if first and first["step"] != res.last_val["step"] else ""
    )
    return f"val loss     {head}{format_losses(res.last_val)} (step {res.last_val['step']})"
