"""``python -m pretrain.generate``: greedy decoding from a checkpoint equals transformers' greedy ``generate``.

Trains 4 steps of the tiny config in one process (``python -m pretrain``, real loader, checkpoint at the end),
exports the checkpoint with ``python -m pretrain.model.export``, and for a few prompts compares the tokens
``python -m pretrain.generate --json`` prints (and ``pretrain.generate.generate`` returns) with ``DeepseekV4ForCausalLM.generate(do_sample=False)`` on the
export (with its KV cache; eos = the dataset's EOS, which the export's config does not carry): the same token
ids, exactly (greedy decoding is discrete: a mismatch is a bug, not rounding).

``model.index_topk=16`` for this run: HF and our CSA pick the top-k compressed entries with ``torch.topk``,
whose order among exactly tied indexer scores (ReLU makes many exactly 0 in an early model) depends on the
tensor's length and differs between the two implementations; with top-k >= the visible entries (16 · 4 = 64
positions) the selection is every entry and the two agree. Prompt + new tokens stay within 64 positions and
past the training length (32) and the sliding window (16).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import run_command

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["And God said unto Moses,", "To be, or not to be", "The import statement", "O"]
NEW_TOKENS = 40
TOPK = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("generate") / "run"
    r = run_command(
        [
            sys.executable,
            "-m",
            "pretrain",
            "--config",
            "tiny",
            f"run.dir={run}",
            f"data.shards_dir={REPO / 'runs' / 'data' / 'tiny'}",
            "train.steps=4",
            "checkpoint.interval=4",
            "train.seq_len=32",
            "train.global_batch=4",
            "train.micro_batch=2",
            "train.warmup_steps=1",
            f"model.index_topk={TOPK}",
            "train.eval_interval=0",
            "run.tensorboard=false",
            "run.progress=false",
            "run.plot=false",
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return run


@pytest.fixture(scope="module")
def hf_dir(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generate_hf") / "hf"
    r = run_command(
        [sys.executable, "-m", "pretrain.model.export", "--run-dir", str(run), "--out", str(out)], timeout=300
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def _generate(run: Path, prompt: str, *extra: str) -> dict:
    r = run_command(
        [
            sys.executable,
            "-m",
            "pretrain.generate",
            "--run-dir",
            str(run),
            "--prompt",
            prompt,
            "--max-new-tokens",
            str(NEW_TOKENS),
            "--json",
            *extra,
        ],
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


def test_generate_equals_transformers_greedy_generate(run, hf_dir):
    from transformers import DeepseekV4ForCausalLM

    from data_pipeline.api import load_tokenizer, special_tokens
    from pretrain.evaluate import run_manifest
    from pretrain.model.export import checkpoint_config, find_checkpoint

    cfg = checkpoint_config(find_checkpoint(run))
    manifest = run_manifest(run, cfg, 32)
    tok, sp = load_tokenizer(manifest), special_tokens(manifest)
    hf = DeepseekV4ForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager", dtype=torch.float32).eval()
    from parallel.process_groups import teardown
    from pretrain.generate import generate

    lengths = []
    for i, prompt in enumerate(PROMPTS):
        if i == 0:
            got = _generate(run, prompt)  # the command line once, the function for the others
        else:
            try:
                got = generate(run, prompt, NEW_TOKENS)
            finally:
                teardown()
        assert set(got) == {"prompt_ids", "output_ids", "text"}
        assert got["prompt_ids"] == tok.encode(prompt, add_special_tokens=False).ids
        assert got["text"] == tok.decode(got["output_ids"], skip_special_tokens=True)
        assert 1 <= len(got["output_ids"]) <= NEW_TOKENS
        assert len(got["prompt_ids"]) + NEW_TOKENS <= cfg.model.index_topk * cfg.model.compress_rate_csa
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([got["prompt_ids"]]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=sp["eos"],
                pad_token_id=sp["pad"],
            )
        want = ref[0, len(got["prompt_ids"]) :].tolist()
        assert got["output_ids"] == want, f"prompt {prompt!r}: ours {got['output_ids']} vs transformers {want}"
        lengths.append(len(got["output_ids"]))
    assert max(lengths) == NEW_TOKENS  # at least one prompt ran the whole length (not stopped at EOS at once)


def test_generate_errors_are_clear(run, tmp_path):
    r = run_command(
        [
            sys.executable,
            "-m",
            "pretrain.generate",
            "--run-dir",
            str(tmp_path / "nope"),
            "--prompt",
            "x",
            "--max-new-tokens",
            "3",
        ],
        timeout=120,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_command(
        [sys.executable, "-m", "pretrain.generate", "--run-dir", str(run), "--prompt", "x", "--max-new-tokens", "0"],
        timeout=120,
    )
    assert r.returncode == 2 and "max-new-tokens" in r.stderr
