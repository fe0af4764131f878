"""Export a training checkpoint to a HuggingFace ``DeepseekV4ForCausalLM`` directory.

    python -m pretrain.model.export --run-dir RUN [--step N] --out DIR [--dtype fp32|bf16]

``RUN`` is a run directory of ``python -m pretrain`` (``RUN/checkpoints/step_*/``, ``RUN/checkpoints/latest``;
``pretrain.checkpoint``), or a ``checkpoints`` directory, or one ``step_*`` directory. Without ``--step`` the
newest checkpoint that passes verification is used (``latest`` first, as a resume would). The checkpoint may have
been saved under any tp/pp/vpp/ep/etp/dp layout: megatron's dist_checkpointing reassembles the full tensors
for a one-process model (tp = pp = ep = 1) built from the model config stored in the checkpoint, which
:func:`pretrain.model.hf.save_hf` then writes (config.json + model.safetensors, MTP weights under ``mtp.*``,
``v4_model_config.json``). ``DeepseekV4ForCausalLM.from_pretrained(DIR)`` loads the result;
``pretrain.model.hf.model_from_hf(DIR)`` restores our model including MTP.

Only the model is read (no optimizer state, RNGs or data position). Exit status: 0 done, 2 a missing run
directory / checkpoint / unusable checkpoint (message on stderr), 1 any other error.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(RuntimeError):
    """A run directory or checkpoint that cannot be exported; the message names the path and the fix."""


def find_checkpoint(run_dir: str | Path, step: Optional[int] = None) -> Path:
    """The checkpoint directory to export: ``step_<N>`` (``step`` given) or the newest valid one."""
    from pretrain.checkpoint import STEP_RE, CheckpointError, step_dir_name, verify_checkpoint_dir

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ExportError(
            f"run directory {run_dir} does not exist; pass the run.dir of a training run (it holds checkpoints/step_*)"
        )
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory; pass the run.dir of a training run")
    if STEP_RE.match(run_dir.name):  # one checkpoint directory given directly
        if step is not None and run_dir.name != step_dir_name(step):
            raise ExportError(f"--step {step} does not match the checkpoint directory {run_dir}")
        candidates_root, forced = run_dir.parent, run_dir
    else:
        candidates_root = run_dir if run_dir.name == "checkpoints" else run_dir / "checkpoints"
        forced = candidates_root / step_dir_name(step) if step is not None else None
    if not candidates_root.is_dir():
        raise ExportError(
            f"no checkpoints in {run_dir}: {candidates_root} does not exist (the run has not "
            f"saved one yet; checkpoints are written every checkpoint.interval steps and at the end)"
        )
    from pretrain.checkpoint import CheckpointManager

    manager = CheckpointManager(candidates_root)
    steps = manager.steps_on_disk()
    if forced is not None:
        if not forced.is_dir():
            have = ", ".join(str(s) for s in steps) or "none"
            raise ExportError(f"checkpoint {forced} does not exist; steps saved in {candidates_root}: {have}")
        try:
            verify_checkpoint_dir(forced)
        except CheckpointError as e:
            raise ExportError(f"checkpoint {forced} is not usable: {e}") from e
        return forced
    if not steps:
        raise ExportError(
            f"no checkpoint in {candidates_root} (no step_* directory; checkpoints are written every "
            f"checkpoint.interval steps and at the end of training)"
        )
    found = manager.find_latest_valid()  # what a resume would pick
    if found is None:
        raise ExportError(
            f"no valid checkpoint in {candidates_root}: every step_* directory ({steps}) failed "
            f"verification (see the warnings above)"
        )
    return found


def checkpoint_config(path: Path) -> Any:
    """The training ``Config`` stored in a checkpoint's common state."""
    from pretrain.checkpoint import CheckpointManager
    from pretrain.config import ConfigError, config_from_dict

    try:
        common = CheckpointManager.load_common(path).get("common")
    except Exception as e:
        raise ExportError(f"{path}: cannot read the checkpoint's common state ({type(e).__name__}: {e})") from e
    if not isinstance(common, dict) or "config" not in common:
        raise ExportError(f"{path}: not a checkpoint written by pretrain's trainer (no config in its common state)")
    try:
        return config_from_dict(common["config"], where=f"{path} (stored config)")
    except ConfigError as e:
        raise ExportError(str(e)) from e


_LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@contextlib.contextmanager
def _one_process_env():
    """A private one-rank rendezvous, whatever launcher variables the shell inherited (an export inside an
    allocation or next to a running job must not join or collide with it): with them removed,
    ``init_torch_distributed`` sees one rank and picks loopback and a free port itself."""
    saved = {k: os.environ.pop(k) for k in _LAUNCHER_VARS if k in os.environ}
    try:
        yield
    finally:
        for k in ("MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
        os.environ.update(saved)


def load_checkpoint_model(path: str | Path, params_dtype: torch.dtype = torch.float32):
    """Our full :class:`DeepSeekV4Model` (one process, eval mode) with the weights of checkpoint ``path``.

    Starts a one-rank process group with megatron's parallel state if none exists (an existing one must have
    tp = pp = 1). Returns ``(model, config)``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from parallel.process_groups import init_distributed
    from pretrain.ckpt_state import model_sharded_state_dict
    from pretrain.config import ParallelConfig
    from pretrain.model.transformer import DeepSeekV4Model

    path = Path(path)
    cfg = checkpoint_config(path)
    if not ps.model_parallel_is_initialized():
        import torch.distributed as dist

        if dist.is_initialized():
            init_distributed(ParallelConfig(), cfg.model)
        else:
            with _one_process_env():
                init_distributed(ParallelConfig(), cfg.model)
    elif ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
        raise ExportError(
            "export builds the full model in one process: the current megatron parallel state must have tp = pp = 1"
        )
    model = DeepSeekV4Model(
        cfg.model,
        params_dtype=params_dtype,
        balance_loss_coeff=cfg.train.seq_aux_loss_coeff,
        bias_update_rate=cfg.train.bias_update_rate,
    )
    sharded = {"model": model_sharded_state_dict([model])}
    try:
        # requested keys absent from the checkpoint raise; the checkpoint's other keys (optimizer state,
        # per-rank objects) are returned as "missing" and checked below
        _, missing, unexpected = dist_checkpointing.load(
            sharded, str(path), validate_access_integrity=True, strict=StrictHandling.RETURN_ALL
        )
    except Exception as e:
        raise ExportError(f"{path}: loading the model weights failed ({type(e).__name__}: {e})") from e
    if unexpected:
        raise ExportError(
            f"{path}: the checkpoint lacks model tensors {sorted(unexpected)[:8]} "
            f"({len(unexpected)} in all) of the model its stored config describes"
        )
    extra = sorted(k for k in missing if not k.startswith(("optimizer.", "rank.")))
    if extra:
        raise ExportError(
            f"{path}: the checkpoint has model tensors the rebuilt model does not "
            f"({extra[:8]}, {len(extra)} in all); was it written by another model version?"
        )
    return model.eval(), cfg


def export(
    run_dir: str | Path, out_dir: str | Path, step: Optional[int] = None, dtype: torch.dtype = torch.float32
) -> Path:
    """Export checkpoint ``step`` (default: the newest valid) of ``run_dir`` to the HF directory ``out_dir``."""
    from pretrain.model.hf import cast_model, save_hf

    path = find_checkpoint(run_dir, step)
    model, _ = load_checkpoint_model(path)
    if dtype != torch.float32:
        cast_model(model, dtype)
    out = save_hf(model, out_dir)
    _record_special_tokens(run_dir, out)
    (out / "source_checkpoint.txt").write_text(f"{path.resolve()}\n")
    log.info("exported %s -> %s", path, out)
    return out


def _record_special_tokens(run_dir: str | Path, out: Path) -> None:
    """Write the run's tokenizer ids (BOS/EOS/PAD of the dataset it trained on) into ``config.json``, so that
    ``generate`` stops where the model was trained to; left as they are when the run recorded no dataset."""
    import json

    from pretrain.evaluate import DATASET_RECORD, run_root

    record = run_root(run_dir) / DATASET_RECORD
    if not record.is_file():
        return
    manifests = json.loads(record.read_text()).get("manifests", {})
    if not manifests:
        return
    from data_pipeline.manifest import read_manifest

    _, m = read_manifest(next(iter(manifests.values())))
    ids = m["special_tokens"]
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    cfg_path.write_text(json.dumps(cfg, indent=2))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.model.export", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="run.dir of a training run (or its checkpoints/ or a step_* dir)")
    ap.add_argument("--step", type=int, default=None, help="step to export (default: newest valid checkpoint)")
    ap.add_argument("--out", required=True, help="output directory (HF save_pretrained layout)")
    ap.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="weight dtype (norms, mHC, sinks, biases stay fp32 as in HF)",
    )
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    from pretrain.cli_logging import setup_cli_logging

    setup_cli_logging()
    from parallel.process_groups import teardown

    try:
        out = export(args.run_dir, args.out, args.step, DTYPES[args.dtype])
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown()
    print(out)
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing may spawn a multiprocessing Manager
    sys.exit(main())
