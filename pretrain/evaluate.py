"""Validation loss: the LM loss of the model over fixed held-out samples, during training and for a checkpoint.

    python -m pretrain.evaluate --run-dir RUN [--step N] [--samples K] [--json]

The samples are the first ``train.eval_samples`` of each source's held-out split
(:func:`data_pipeline.validation.validation_batches`): the same rows at every evaluation. With S = seq_len
labels per sample (all of them count: labels = tokens[1:], none ignored) and n_s samples of source s,

    val_loss/<s> = (1 / (n_s S)) Σ_{i ∈ s} Σ_t CE(logits_{i,t}, y_{i,t})
    val_loss     = Σ_s n_s S · val_loss/<s>  /  Σ_s n_s S        (the token mean over all evaluated samples)

Only the LM head's loss: no MTP (the MTP block is not run), no balance or indexer term.

During training (:class:`Validator`, ``train.eval_interval``): forward only through megatron's schedule on
the trainer's own model chunks (1F1B / interleaved for pp > 1, no gradients), under every layout. The rows of
each source are split over the data-parallel ranks in contiguous blocks and cut into micro-batches of
``train.micro_batch``; blocks are padded with rows whose labels are all ignored (-100) to equal micro-batch
counts on every rank (and a multiple of pp under vpp), so any eval_samples works with any layout. Each
micro-batch contributes (its token-mean LM loss) × (its labelled-token count) on the last pipeline stage;
these sums are reduced over data parallel × Ulysses (÷ sp: each sp rank's loss is its shard's sum over
N/sp) and over the pipeline, then divided by Σ n_s S: the one-process value for any tp/pp/vpp/ep/dp/sp.
Training is untouched: the RNG streams, the modules' train/eval flags, the stages' loss sums and megatron's
auxiliary-loss scales are restored afterwards and nothing is counted (the routers' load counters only count
with gradients enabled).

The command line evaluates a checkpoint in one process (the full model as ``pretrain.model.export`` loads it)
on the dataset the run recorded (``RUN/dataset.json``), at the sequence length and attention mode of the
checkpoint's step, and prints a table and one JSON line (``--json``: only the JSON line).
Exit status: 0 done, 2 a missing run/checkpoint/dataset/validation split (message on stderr), 1 other errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DATASET_RECORD = "dataset.json"  # <run.dir>/dataset.json: {"manifests": {"<seq_len>": "<manifest path>"}}


# --------------------------------------------------------------------------------------------- batches
def eval_microbatches(
    batches: dict[str, dict[str, np.ndarray]], micro_batch: int, dp_rank: int = 0, dp: int = 1, multiple_of: int = 1
) -> list[tuple[int, dict[str, torch.Tensor], int]]:
    """This data-parallel rank's micro-batches: ``(source index, inputs, labelled tokens)`` in source order.

    Source s with n rows: rank r takes rows [r·R, (r+1)·R) (R = ⌈n/dp⌉), padded to M_s·micro_batch rows
    (M_s = ⌈R/micro_batch⌉) with ignored rows; all-padding micro-batches (source -1) are appended until the
    count is a multiple of ``multiple_of`` (pp under the interleaved schedule). The same count on every rank.
    ``inputs``: input_ids = tokens[:, :-1], labels = tokens[:, 1:], doc_ids = doc_ids[:, :-1] (no MTP labels)."""
    out: list[tuple[int, dict[str, torch.Tensor], int]] = []
    for s, b in enumerate(batches.values()):
        tokens, doc = torch.as_tensor(b["tokens"], dtype=torch.long), torch.as_tensor(b["doc_ids"])
        n, sample_len = tokens.shape
        per_rank = -(-n // dp)
        mine = slice(min(n, dp_rank * per_rank), min(n, (dp_rank + 1) * per_rank))
        rows = -(-per_rank // micro_batch) * micro_batch
        inp = torch.zeros(rows, sample_len - 1, dtype=torch.long)
        lab = torch.full((rows, sample_len - 1), IGNORE_INDEX, dtype=torch.long)
        ids = torch.zeros(rows, sample_len - 1, dtype=doc.dtype)
        k = mine.stop - mine.start
        inp[:k], lab[:k], ids[:k] = tokens[mine, :-1], tokens[mine, 1:], doc[mine, :-1]
        for lo in range(0, rows, micro_batch):
            mb = {
                "input_ids": inp[lo : lo + micro_batch],
                "labels": lab[lo : lo + micro_batch],
                "doc_ids": ids[lo : lo + micro_batch],
            }
            out.append((s, mb, int((mb["labels"] != IGNORE_INDEX).sum())))
    if not out:
        raise ValueError("eval_microbatches: no validation samples")
    while len(out) % multiple_of:
        pad = {k: v.clone() for k, v in out[-1][1].items()}
        pad["labels"].fill_(IGNORE_INDEX)
        out.append((-1, pad, 0))
    return out


def token_counts(batches: dict[str, dict[str, np.ndarray]]) -> list[int]:
    """Σ n_s S per source: the labelled tokens of each source's samples."""
    return [int(b["tokens"].shape[0]) * (int(b["tokens"].shape[1]) - 1) for b in batches.values()]


def loss_record(names: list[str], sums: torch.Tensor, counts: list[int]) -> dict[str, float]:
    """``{"val_loss": ..., "val_loss/<source>": ...}`` from the per-source CE sums and token counts."""
    rec = {"val_loss": float(sums.sum()) / sum(counts)}
    rec.update({f"val_loss/{n}": float(v) / c for n, v, c in zip(names, sums.tolist(), counts)})
    return rec


# --------------------------------------------------------------------------------------------- in training
@contextlib.contextmanager
def _training_state_preserved(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """Eval mode and no gradients inside; afterwards every RNG stream, each module's train flag, the stages'
    loss sums and megatron's auxiliary-loss backward scales are as before."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from parallel import pipeline
    from pretrain.ckpt_state import rng_state, set_rng_state

    rng = rng_state()
    flags = [(m, m.training) for c in chunks for m in c.modules()]
    sums = [(st, st.sums.clone()) for st in (pipeline.unwrap(c) for c in chunks)]
    scales = {cls: getattr(cls, "main_loss_backward_scale", None) for cls in (MoEAuxLossAutoScaler, MTPLossAutoScaler)}
    scales = {cls: (None if v is None else v.clone()) for cls, v in scales.items()}
    try:
        for c in chunks:
            c.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        for st, v in sums:
            st.sums.copy_(v)
        for cls, v in scales.items():
            cur = getattr(cls, "main_loss_backward_scale", None)
            if v is None or cur is None or cur.shape != v.shape:
                cls.main_loss_backward_scale = v
            else:
                cur.copy_(v)
        set_rng_state(rng)


class Validator:
    """The trainer's validation: :meth:`losses` runs the held-out micro-batches forward through the pipeline
    schedule on ``chunks`` (collective over all ranks) and returns the one-process ``val_loss`` record."""

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        micro_batch: int,
        samples: int,
        device: torch.device,
        autocast: Callable[[], Any] = contextlib.nullcontext,
    ) -> None:
        self.chunks, self.micro_batch, self.samples = chunks, micro_batch, samples
        self.device, self.autocast = device, autocast
        self._batches: dict[tuple[str, int], dict[str, dict[str, np.ndarray]]] = {}

    def batches(self, manifest: str | Path, seq_len: int) -> dict[str, dict[str, np.ndarray]]:
        """The held-out samples of ``manifest`` (read once, then cached)."""
        from data_pipeline.validation import validation_batches

        key = (str(manifest), seq_len)
        if key not in self._batches:
            self._batches[key] = validation_batches(manifest, seq_len, self.samples)
        return self._batches[key]

    @staticmethod
    def due(step: int, interval: int, last_step: int) -> bool:
        return interval > 0 and (step % interval == 0 or step == last_step)

    def losses(self, manifest: str | Path, seq_len: int) -> dict[str, float]:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from parallel import pipeline

        batches = self.batches(manifest, seq_len)
        names = list(batches)
        pp = ps.get_pipeline_model_parallel_world_size()
        mbs = eval_microbatches(
            batches,
            self.micro_batch,
            ps.get_data_parallel_rank(),
            ps.get_data_parallel_world_size(),
            pp if len(self.chunks) > 1 else 1,
        )
        mbs = [(s, {k: v.to(self.device) for k, v in mb.items()}, n) for s, mb, n in mbs]
        sums = torch.zeros(len(names), dtype=torch.float64)
        lm = pipeline.LOSS_KEYS.index("lm_loss")

        def loss_func(output: torch.Tensor):
            return output, torch.ones((), dtype=torch.int), {}

        def step(data_iterator, model):
            src, batch, count = next(data_iterator)
            st = pipeline.unwrap(model)
            st.sums.zero_()
            out = model(batch, mtp_lambda=0.0)
            if st.post_process and src >= 0:  # this micro-batch's token-mean LM loss × its token count
                sums[src] += st.sums[lm] * count
            return out, loss_func

        with _training_state_preserved(self.chunks), self.autocast():
            iters = [iter(mbs) for _ in self.chunks]
            b, s = mbs[0][1]["input_ids"].shape
            get_forward_backward_func()(
                forward_step_func=step,
                data_iterator=iters if len(self.chunks) > 1 else iters[0],
                model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                num_microbatches=len(mbs),
                seq_length=s,
                micro_batch_size=b,
                forward_only=True,
            )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else sums.device
            sums = sums.to(dev)
            dist.all_reduce(sums, group=ps.get_data_parallel_group(with_context_parallel=True))
            sums /= ps.get_context_parallel_world_size()  # each Ulysses rank holds sp × its shard's sum
            dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())  # only the last stage is non-zero
            sums = sums.cpu()
        return loss_record(names, sums, token_counts(batches))


def format_losses(rec: dict[str, Any]) -> str:
    """``val_loss 5.4321 (kjv 5.1, shakespeare 5.6, ...)`` for log lines and the run summary."""
    parts = [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in rec.items() if k.startswith("val_loss/")]
    return f"{rec['val_loss']:.4f}" + (f" ({', '.join(parts)})" if parts else "")


# --------------------------------------------------------------------------------------------- a checkpoint
class EvaluateError(RuntimeError):
    """A run, checkpoint or dataset that cannot be evaluated; the message names the path and the fix."""


def run_root(run_dir: str | Path) -> Path:
    """The run.dir of a run directory, its ``checkpoints`` directory or one ``step_*`` directory."""
    from pretrain.checkpoint import STEP_RE

    p = Path(run_dir)
    if STEP_RE.match(p.name):
        p = p.parent
    return p.parent if p.name == "checkpoints" else p


def run_manifest(run_dir: str | Path, cfg: Any, seq_len: int) -> Path | str:
    """The manifest of the dataset the run trained on at ``seq_len``: recorded by the trainer in
    ``<run.dir>/dataset.json``; for runs without the record, where ``data.shards_dir`` of the stored config
    puts it (relative paths: from the current directory)."""
    record = run_root(run_dir) / DATASET_RECORD
    if record.is_file():
        manifests = json.loads(record.read_text()).get("manifests", {})
        if str(seq_len) in manifests:
            m = manifests[str(seq_len)]
            return m if "://" in m else Path(m)  # an object-store URL stays a URL
        if manifests:
            raise EvaluateError(
                f"{record}: no dataset recorded for seq_len {seq_len} (recorded: {', '.join(sorted(manifests))})"
            )
    from data_pipeline.api import dataset_dir

    d = cfg.data
    path = dataset_dir(d.shards_dir, d.mixture, d.vocab_size, seq_len, d.tokenizer) / "manifest.json"
    if not path.is_file():
        raise EvaluateError(
            f"the run {run_root(run_dir)} has no {DATASET_RECORD} and its dataset {path} does not "
            f"exist: run from the directory the training started in (data.shards_dir="
            f"{d.shards_dir} is relative to it)"
        )
    return path


def checkpoint_step(path: Path) -> int:
    from pretrain.checkpoint import STEP_RE

    m = STEP_RE.match(path.name)
    if not m:
        raise EvaluateError(f"{path}: not a step_* checkpoint directory")
    return int(m.group(1))


def evaluate_checkpoint(
    run_dir: str | Path, step: Optional[int] = None, samples: Optional[int] = None, device: str = "cpu"
) -> dict[str, Any]:
    """Validation losses of checkpoint ``step`` (default: newest valid) of ``run_dir`` in this process."""
    from data_pipeline.manifest import ManifestError
    from data_pipeline.validation import validation_batches
    from pretrain import step_utils as su
    from pretrain.model.export import ExportError, find_checkpoint, load_checkpoint_model
    from pretrain.schedules import Schedules

    try:
        path = find_checkpoint(run_dir, step)
        model, cfg = load_checkpoint_model(path)
    except ExportError as e:
        raise EvaluateError(str(e)) from e
    step = checkpoint_step(path)
    sched = Schedules(cfg.train, dp=1, default_attention_mode=cfg.model.attention_mode).at(max(step - 1, 0))
    su.set_attention_mode(model, sched.attention_mode)
    manifest = run_manifest(run_dir, cfg, sched.seq_len)
    try:
        batches = validation_batches(manifest, sched.seq_len, samples or cfg.train.eval_samples)
    except (ManifestError, ValueError) as e:
        raise EvaluateError(str(e)) from e
    model = model.to(device)
    names = list(batches)
    sums = torch.zeros(len(names), dtype=torch.float64)
    t0 = time.monotonic()
    with torch.no_grad():
        for src, mb, count in eval_microbatches(batches, cfg.train.micro_batch):
            mb = {k: v.to(device) for k, v in mb.items()}
            out = model(mb["input_ids"], doc_ids=mb["doc_ids"], labels=mb["labels"])
            sums[src] += out["lm_loss"].double().cpu() * count
    rec = {
        "step": step,
        "checkpoint": str(path),
        "seq_len": sched.seq_len,
        "samples": {n: int(b["tokens"].shape[0]) for n, b in batches.items()},
    }
    rec.update(loss_record(names, sums, token_counts(batches)))
    rec["seconds"] = time.monotonic() - t0
    return rec


def table(rec: dict[str, Any]) -> str:
    rows = [
        (k.split("/", 1)[1], rec["samples"][k.split("/", 1)[1]], v) for k, v in rec.items() if k.startswith("val_loss/")
    ]
    rows.append(("all", sum(rec["samples"].values()), rec["val_loss"]))
    w = max(len(r[0]) for r in rows)
    lines = [
        f"validation loss of {rec['checkpoint']} (step {rec['step']}, seq_len {rec['seq_len']})",
        f"{'source':<{w}}  samples  val_loss",
        f"{'-' * w}  -------  --------",
    ]
    lines += [f"{n:<{w}}  {s:7d}  {v:8.4f}" for n, s, v in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="run.dir of a training run (or its checkpoints/ or a step_* dir)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest valid checkpoint)")
    ap.add_argument(
        "--samples", type=int, default=None, help="held-out samples per source (default: the run's train.eval_samples)"
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    from pretrain.cli_logging import setup_cli_logging

    setup_cli_logging(quiet=args.json)
    from parallel.process_groups import teardown

    try:
        rec = evaluate_checkpoint(args.run_dir, args.step, args.samples, args.device)
    except EvaluateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown()
    if not args.json:
        print(table(rec))
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing may spawn a multiprocessing Manager
    sys.exit(main())
