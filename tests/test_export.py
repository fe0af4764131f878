"""``python -m pretrain.model.export``: a training checkpoint -> HF ``DeepseekV4ForCausalLM`` directory.

Trains 2 steps of the tiny config (``python -m pretrain``, real data loader, dist_checkpointing) in one process
and with 2 ranks under pipeline parallelism (pp=2: the checkpoint is resharded into the one-process model,
the last stage's MTP embedding copy is stored once), exports the step-2 checkpoint with the CLI, loads it with
HF ``from_pretrained`` and compares HF's logits with our model loaded from the same checkpoint (fp32, 1e-5
relative). Clear errors (exit 2) for a missing run directory, a run without checkpoints and a missing step.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.process_groups import free_port
from tests.harness import run_command

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return run_command([sys.executable, *args], timeout=timeout)


def _export(*args: str) -> subprocess.CompletedProcess:
    return _run(["-m", "pretrain.model.export", *args], timeout=300)


def _train(run: Path, ranks: int, extra: list[str]) -> Path:
    args = [
        "-m",
        "pretrain",
        "--config",
        "tiny",
        f"run.dir={run}",
        f"data.shards_dir={REPO / 'runs' / 'data' / 'tiny'}",
        "train.steps=2",
        "checkpoint.interval=2",
        "train.seq_len=32",
        "train.global_batch=2",
        "train.micro_batch=1",
        "train.warmup_steps=1",
        "run.tensorboard=false",
        "run.progress=false",
        *extra,
    ]
    if ranks > 1:
        args = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}", *args]
    r = _run(args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (run / "checkpoints" / "step_00000002").is_dir()
    return run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("export") / "run", 1, [])


@pytest.fixture(scope="module")
def trained_run_pp2(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("export_pp2") / "run", 2, ["parallel.pp=2"])


@pytest.mark.parametrize("run_fixture", ["trained_run", "trained_run_pp2"], ids=["one-process", "pp2"])
def test_export_loads_in_hf_with_our_logits(run_fixture, request, tmp_path):
    from transformers import DeepseekV4ForCausalLM

    from parallel.process_groups import teardown
    from pretrain.model.export import find_checkpoint, load_checkpoint_model

    trained_run = request.getfixturevalue(run_fixture)
    out = tmp_path / "hf"
    r = _export("--run-dir", str(trained_run), "--step", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))

    ckpt = find_checkpoint(trained_run, 2)
    assert ckpt.name == "step_00000002" and find_checkpoint(trained_run) == ckpt  # latest = step 2
    try:
        ours, cfg = load_checkpoint_model(ckpt)
        # the trained weights, not the init: the routers' expert bias moved during the 2 steps
        assert any(b.abs().sum() > 0 for n, b in ours.named_buffers() if n.endswith("expert_bias"))
        hf = DeepseekV4ForCausalLM.from_pretrained(str(out), attn_implementation="eager", dtype=torch.float32).eval()
        seq = 32
        assert cfg.model.index_topk >= seq // cfg.model.compress_rate_csa  # top-k selects every entry (ties)
        ids = torch.randint(0, cfg.model.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = ours(ids)
            ref = hf(ids).logits
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        assert rel < 1e-5, rel
        # every tensor HF holds is the checkpoint's (no drift through the conversion)
        from pretrain.model.hf import hf_state_dict

        ours_sd = {k: v for k, v in hf_state_dict(ours).items() if not k.startswith("mtp.")}
        hf_sd = hf.state_dict()
        assert set(ours_sd) == set(hf_sd)
        for k, v in ours_sd.items():
            assert torch.equal(v, hf_sd[k]), k
    finally:
        teardown()


def test_export_errors_are_clear(trained_run, tmp_path):
    r = _export("--run-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "nope" in r.stderr
    empty = tmp_path / "empty_run"
    empty.mkdir()
    r = _export("--run-dir", str(empty), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no checkpoints in" in r.stderr
    r = _export("--run-dir", str(trained_run), "--step", "7", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "step_00000007" in r.stderr and "steps saved" in r.stderr and ": 2" in r.stderr
    assert not (tmp_path / "o").exists()
