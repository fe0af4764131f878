"""Greedy text generation from a training checkpoint: a model you can talk to.

    python -m pretrain.generate --run-dir RUN [--step N] --prompt TEXT --max-new-tokens K [--json] [--device cpu]

Loads checkpoint ``step`` (default: the newest valid one) as one full model in one process (any training layout;
the same loading as ``pretrain.model.export``), and the run's tokenizer from the dataset manifest the run
recorded (``RUN/dataset.json``; ``pretrain.evaluate.run_manifest``). The prompt is encoded like a document
in training (``add_special_tokens=False``, BOS first only if the dataset packs documents with BOS), then

    x_{t+1} = argmax_v logits(x_1 .. x_t)_v          (first index on ties, as ``torch.argmax``)

for at most K tokens, stopping after the dataset's EOS. No KV cache: each token is one full forward of the
sequence so far (fine for the small models this is for). The tokens equal transformers' greedy ``generate``
(``do_sample=False``, ``eos_token_id`` = the dataset's EOS) on the directory ``python -m pretrain.model.export``
writes for the same checkpoint (tests/test_generate.py).

Output: the prompt and its continuation; ``--json``: one line ``{"prompt_ids": [...], "output_ids": [...],
"text": "..."}`` with ``output_ids`` the generated tokens only (the EOS included when it ended the text) and
``text`` their decoding (special tokens skipped). Exit status: 0 done, 2 a missing run/checkpoint/dataset or a
bad argument (message on stderr), 1 other errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


class GenerateError(RuntimeError):
    """A run, checkpoint, dataset or argument that cannot be used; the message names it and the fix."""


@torch.no_grad()
def greedy(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_id: Optional[int] = None,
    device: str | torch.device = "cpu",
) -> list[int]:
    """The greedy continuation of ``prompt_ids`` (at most ``max_new_tokens``, ending after ``eos_id``)."""
    if not prompt_ids:
        raise GenerateError("the prompt encodes to no tokens; give a non-empty --prompt")
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids)[:, -1]
        nxt = int(logits.argmax(dim=-1))
        out.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], dtype=torch.long, device=device)], dim=1)
    return out


def load_run(run_dir: str | Path, step: Optional[int] = None, device: str = "cpu") -> tuple[Any, Any, dict, Path]:
    """(model in eval mode on ``device``, tokenizer, manifest dict, checkpoint path) of a run's checkpoint."""
    from data_pipeline.api import load_tokenizer
    from data_pipeline.manifest import ManifestError, read_manifest
    from pretrain.evaluate import EvaluateError, checkpoint_step, run_manifest
    from pretrain.model.export import ExportError, find_checkpoint, load_checkpoint_model
    from pretrain.schedules import Schedules

    try:
        path = find_checkpoint(run_dir, step)
        model, cfg = load_checkpoint_model(path)
        seq_len = Schedules(cfg.train, dp=1).at(max(checkpoint_step(path) - 1, 0)).seq_len
        manifest_path = run_manifest(run_dir, cfg, seq_len)
        _, manifest = read_manifest(manifest_path)
        tokenizer = load_tokenizer(manifest_path)
    except (ExportError, EvaluateError, ManifestError) as e:
        raise GenerateError(str(e)) from e
    return model.to(device).eval(), tokenizer, manifest, path


def encode_prompt(tokenizer: Any, manifest: dict, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a document starts in the packed data (BOS first if the dataset adds one)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    add_bos = bool(manifest.get("mixture", {}).get("pack", {}).get("add_bos", False))
    return [int(manifest["special_tokens"]["bos"])] + ids if add_bos else ids


def generate(
    run_dir: str | Path, prompt: str, max_new_tokens: int, step: Optional[int] = None, device: str = "cpu"
) -> dict[str, Any]:
    """``{"prompt_ids", "output_ids", "text"}`` for ``prompt`` from checkpoint ``step`` of ``run_dir``."""
    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens {max_new_tokens}: give at least 1")
    model, tokenizer, manifest, path = load_run(run_dir, step, device)
    prompt_ids = encode_prompt(tokenizer, manifest, prompt)
    limit = model.cfg.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > limit:
        raise GenerateError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds the "
            f"model's max_position_embeddings={limit}; shorten one of them"
        )
    log.info("generating from %s: %d prompt tokens, up to %d new", path, len(prompt_ids), max_new_tokens)
    out = greedy(model, prompt_ids, max_new_tokens, int(manifest["special_tokens"]["eos"]), device)
    return {"prompt_ids": prompt_ids, "output_ids": out, "text": tokenizer.decode(out, skip_special_tokens=True)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="run.dir of a training run (or its checkpoints/ or a step_* dir)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest valid checkpoint)")
    ap.add_argument("--prompt", required=True, help="text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (stops at EOS)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", action="store_true", help="print one JSON line {prompt_ids, output_ids, text}")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    from pretrain.cli_logging import setup_cli_logging

    setup_cli_logging(quiet=args.json)
    from parallel.process_groups import teardown

    try:
        res = generate(args.run_dir, args.prompt, args.max_new_tokens, args.step, args.device)
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown()
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.prompt}\033[1m{res['text']}\033[0m" if sys.stdout.isatty() else f"{args.prompt}{res['text']}")
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing may spawn a multiprocessing Manager
    sys.exit(main())
