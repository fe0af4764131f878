"""Run metrics (rank 0 writes; other ranks hold a disabled logger).

``<run.dir>/metrics.jsonl`` -- one JSON object per optimizer step (an interface: other tools read it):

    step            1-based index of the optimizer step just finished
    loss            the training objective (L_LM + lambda L_MTP + L_bal + c_I L_idx), token-weighted mean over
                    the global batch (all micro-batches, all data-parallel ranks)
    lm_loss, mtp_loss, balance_loss, indexer_loss   the parts, same averaging
    lr, grad_norm   learning rate; global gradient 2-norm before clipping (null for a skipped step)
    tokens, tokens_total, tokens_per_s, step_time_s, mfu (fraction of peak, estimate), eta_s
    global_batch, seq_len, attention_mode, mtp_lambda, bias_update_rate
    expert_load_max_over_mean, expert_load_cv   routed-token loads of all learned routers, global batch
    skipped (bool), skipped_total, rollback (bool), time (unix)
    val_loss, val_loss/<source>, val_time_s   only on the steps with a validation (``train.eval_interval``, and
                    the last step): the LM loss over the fixed held-out samples, all sources (token mean) and
                    per source (pretrain.evaluate)

On resume, lines with a step beyond the checkpoint are dropped first, so each step appears once.
Also: TensorBoard scalars under ``<run.dir>/tensorboard``, a progress bar (tqdm on a terminal, a log line
every ``train.log_interval`` steps otherwise; a validation is always logged), and ``<run.dir>/loss.png`` at the
end (training and validation curves). TensorBoard tags: ``train/<key>``, ``val/loss``, ``val/<source>``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TB_KEYS = (
    "loss",
    "lm_loss",
    "mtp_loss",
    "balance_loss",
    "indexer_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "expert_load_max_over_mean",
    "expert_load_cv",
    "global_batch",
    "seq_len",
    "mtp_lambda",
)


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line torn by a kill -9: ignore it
                continue
    return out


def truncate_after(path: Path, step: int) -> None:
    """Keep only records with ``step <= step`` (atomic rewrite)."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in keep)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        tensorboard: bool = True,
        progress: bool = True,
        log_interval: int = 1,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_interval = max(1, log_interval)
        self.path = self.run_dir / "metrics.jsonl"
        self._fh = None
        self._tb = None
        self._bar = None
        self._want_tb = tensorboard
        self._want_bar = progress

    def open(self, resume_step: int) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, resume_step)
        self._fh = open(self.path, "a", buffering=1)  # noqa: SIM115 (open for the whole run)
        if self._want_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError as e:  # tensorboard missing: keep going with jsonl
                log.warning("TensorBoard disabled (%s)", e)
        if self._want_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=resume_step, dynamic_ncols=True, unit="step")

    def log(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {
            k: (None if isinstance(v, float) and not math.isfinite(v) and k == "grad_norm" else v)
            for k, v in rec.items()
        }
        self._fh.write(json.dumps(rec, allow_nan=True) + "\n")
        step = rec["step"]
        if self._tb is not None:
            for k in TB_KEYS:
                v = rec.get(k)
                if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)
            for k, v in rec.items():
                if k.startswith("val_loss") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar("val/loss" if k == "val_loss" else f"val/{k.split('/', 1)[1]}", v, step)
        line = self.format(rec)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(line, refresh=False)
        elif step % self.log_interval == 0 or step == self.total_steps or "val_loss" in rec:
            log.info("step %d/%d %s", step, self.total_steps, line)
        if "val_loss" in rec:
            from pretrain.evaluate import format_losses

            msg = f"step {step} validation: val_loss {format_losses(rec)} ({rec.get('val_time_s', 0):.1f} s)"
            if self._bar is not None:
                self._bar.write(msg)
            else:
                log.info("%s", msg)

    @staticmethod
    def format(rec: dict[str, Any]) -> str:
        eta = rec.get("eta_s")
        eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if isinstance(eta, (int, float)) else "?"
        mfu = rec.get("mfu")
        parts = [
            f"loss {rec['loss']:.4f}",
            f"lr {rec['lr']:.2e}",
            f"{rec.get('tokens_per_s', 0):.0f} tok/s",
            f"mfu {100 * mfu:.1f}%" if isinstance(mfu, float) else "mfu ?",
            f"eta {eta_s}",
        ]
        if isinstance(rec.get("val_loss"), (int, float)):
            parts.insert(1, f"val {rec['val_loss']:.4f}")
        if rec.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        return " | ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def plot_losses(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Loss curves vs step from metrics.jsonl: the objective and the LM loss of the training batches, and the
    validation loss (all sources, and each source dashed) where the run evaluated; returns the PNG path."""
    recs = [r for r in read_metrics(metrics_path) if isinstance(r.get("loss"), (int, float))]
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in recs], label="loss (objective)", lw=1.2)
    if all(isinstance(r.get("lm_loss"), (int, float)) for r in recs):
        ax.plot(steps, [r["lm_loss"] for r in recs], label="LM loss", lw=1.0, alpha=0.8)
    val = [r for r in recs if isinstance(r.get("val_loss"), (int, float))]
    if val:
        vs = [r["step"] for r in val]
        ax.plot(vs, [r["val_loss"] for r in val], "o-", label="validation LM loss", lw=1.6, ms=3.5, color="black")
        sources = sorted({k.split("/", 1)[1] for r in val for k in r if k.startswith("val_loss/")})
        for src in sources:
            pts = [(r["step"], r[f"val_loss/{src}"]) for r in val if isinstance(r.get(f"val_loss/{src}"), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", lw=0.9, alpha=0.8, label=f"validation: {src}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or f"{metrics_path.parent.name} ({time.strftime('%Y-%m-%d')})")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
