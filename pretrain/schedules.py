"""DeepSeek-V4 training schedules (docs/MODEL.md §12.3-12.4), scaled by the config to any run length.

Everything here is a pure function of the optimizer step ``s`` (0-based: the step being taken) and the
``train`` config, so resuming needs only the step; the checkpoint still stores ``Schedules.state_dict()`` to
detect a changed schedule on resume.

- Learning rate: linear warm-up over ``warmup_steps`` (``lr * (s + 1) / warmup_steps``), constant at ``lr``
  until ``decay_start * steps``, then cosine decay to ``min_lr_ratio * lr`` at the last step.
- Global batch ramp: linear from ``batch_ramp_start`` to ``global_batch`` sequences over ``batch_ramp_steps``,
  rounded down to a multiple of ``micro_batch * dp`` (at least one micro-batch per data-parallel rank).
- Sequence-length stages: ``seq_len_stages = [[start_step, seq_len], ...]``; before the first stage,
  ``train.seq_len``.
- YaRN stages (context extension): ``yarn_stages = [[start_step, factor], ...]``: the YaRN factor of the CSA/HCA
  RoPE from that step (``factor <= 1``: YaRN off, plain RoPE at ``compress_rope_theta``); before the first stage
  (or without stages) the model config's ``model.yarn``. ``yarn_factor`` is None where the model's own applies.
  As everything here a function of the step only: a resume at any step, a stage boundary included, gets the
  stage's factor again (``pretrain.model.rope.set_yarn_factor`` applies it to the model).
- Attention: ``dense`` for ``dense_attention_steps``, then ``indexer_warmup`` (main model frozen, indexer
  trained with its KL loss) for ``indexer_warmup_steps``, then ``sparse``. With both at 0 the model config's
  ``attention_mode`` is used for the whole run.
- MTP loss weight lambda: ``mtp_lambda`` (0.3) until LR decay starts, ``mtp_lambda_decay`` (0.1) after.
- Expert-bias update rate gamma (0.001) and sequence-balance coefficient alpha (0.0001): constant, but the
  bias is not updated while the main model is frozen (indexer warm-up).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class StepSchedule:
    step: int
    lr: float
    phase: str  # "warmup" | "constant" | "decay"
    global_batch: int
    micro_batches: int  # micro-batches per data-parallel rank for this step
    seq_len: int
    seq_stage: int  # index into the stage list (0 = train.seq_len before any stage)
    yarn_factor: float | None  # YaRN factor of this step's stage (None: the model config's yarn)
    attention_mode: str  # "dense" | "indexer_warmup" | "sparse"
    mtp_lambda: float
    bias_update_rate: float
    seq_aux_loss_coeff: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Schedules:
    """All per-step schedules of a run. ``dp`` is the data-parallel size (for batch rounding)."""

    def __init__(self, train: Any, dp: int = 1, default_attention_mode: str = "sparse") -> None:
        self.t = train
        self.dp = dp
        self.default_attention_mode = default_attention_mode
        for i, st in enumerate(train.seq_len_stages or []):
            if len(st) != 2 or st[0] < 0 or st[1] <= 0:
                raise ValueError(f"train.seq_len_stages[{i}]={st}: expected [start_step >= 0, seq_len > 0]")
        self.stages = sorted((int(a), int(b)) for a, b in (train.seq_len_stages or []))
        for i, st in enumerate(getattr(train, "yarn_stages", None) or []):
            if len(st) != 2 or st[0] < 0 or st[0] != int(st[0]) or st[1] <= 0:
                raise ValueError(f"train.yarn_stages[{i}]={st}: expected [start_step >= 0 (an integer), factor > 0]")
        self.yarn_stages = sorted((int(a), float(b)) for a, b in (getattr(train, "yarn_stages", None) or []))
        unit = train.micro_batch * dp
        if train.global_batch % unit:
            raise ValueError(
                f"train.global_batch={train.global_batch} is not divisible by micro_batch*dp = "
                f"{train.micro_batch}*{dp} = {unit}; choose a multiple of {unit}"
            )
        self.decay_start_step = math.floor(train.decay_start * train.steps)

    # ---------------------------------------------------------------------------------------------
    def lr(self, s: int) -> tuple[float, str]:
        t = self.t
        if t.warmup_steps > 0 and s < t.warmup_steps:
            return t.lr * (s + 1) / t.warmup_steps, "warmup"
        start = max(self.decay_start_step, t.warmup_steps)
        if s < start:
            return t.lr, "constant"
        span = max(1, t.steps - 1 - start)
        frac = min(1.0, (s - start) / span)
        lo = t.min_lr_ratio * t.lr
        return lo + 0.5 * (t.lr - lo) * (1.0 + math.cos(math.pi * frac)), "decay"

    def global_batch(self, s: int) -> int:
        t = self.t
        unit = t.micro_batch * self.dp
        if t.batch_ramp_steps <= 0 or s >= t.batch_ramp_steps:
            return t.global_batch
        start = t.batch_ramp_start or unit
        gb = start + (t.global_batch - start) * s / t.batch_ramp_steps
        return max(unit, int(gb) // unit * unit)

    def seq_len(self, s: int) -> tuple[int, int]:
        length, idx = self.t.seq_len, 0
        for i, (start, sl) in enumerate(self.stages):
            if s >= start:
                length, idx = sl, i + 1
        return length, idx

    def yarn_factor(self, s: int) -> float | None:
        factor = None
        for start, f in self.yarn_stages:
            if s >= start:
                factor = f
        return factor

    def attention_mode(self, s: int) -> str:
        t = self.t
        if t.dense_attention_steps <= 0 and t.indexer_warmup_steps <= 0:
            return self.default_attention_mode
        if s < t.dense_attention_steps:
            return "dense"
        if s < t.dense_attention_steps + t.indexer_warmup_steps:
            return "indexer_warmup"
        return "sparse"

    def at(self, s: int) -> StepSchedule:
        t = self.t
        lr, phase = self.lr(s)
        gb = self.global_batch(s)
        seq_len, stage = self.seq_len(s)
        mode = self.attention_mode(s)
        lam = t.mtp_lambda_decay if phase == "decay" else t.mtp_lambda
        gamma = 0.0 if mode == "indexer_warmup" else t.bias_update_rate
        return StepSchedule(
            step=s,
            lr=lr,
            phase=phase,
            global_batch=gb,
            micro_batches=gb // (t.micro_batch * self.dp),
            seq_len=seq_len,
            seq_stage=stage,
            yarn_factor=self.yarn_factor(s),
            attention_mode=mode,
            mtp_lambda=lam,
            bias_update_rate=gamma,
            seq_aux_loss_coeff=t.seq_aux_loss_coeff,
        )

    def tokens_through(self, s: int) -> int:
        """Tokens consumed by steps 0..s-1 (for logs and the ETA)."""
        total = 0
        for k in range(s):
            total += self.global_batch(k) * self.seq_len(k)[0]
        return total

    # ---------------------------------------------------------------------------------------------
    _KEYS = (
        "steps",
        "lr",
        "min_lr_ratio",
        "warmup_steps",
        "decay_start",
        "global_batch",
        "micro_batch",
        "batch_ramp_steps",
        "batch_ramp_start",
        "seq_len",
        "seq_len_stages",
        "yarn_stages",
        "dense_attention_steps",
        "indexer_warmup_steps",
        "mtp_lambda",
        "mtp_lambda_decay",
        "bias_update_rate",
        "seq_aux_loss_coeff",
    )

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self.t, k, []) for k in self._KEYS}

    def changed_keys(self, saved: dict[str, Any]) -> list[str]:
        """Keys whose value differs from a checkpoint's schedule (logged as a warning on resume)."""
        now = self.state_dict()
        return [k for k in self._KEYS if k in saved and saved[k] != now[k]]
