"""Fast trainer pieces: guards, metrics file, preemption flag, batch split, config/layout errors."""

import json
import math
import os
import random
import signal

import pytest
import torch

from pretrain.guards import Guards, NonFiniteError
from pretrain.metrics import plot_losses, read_metrics, truncate_after
from pretrain.signals import PreemptionHandler
from pretrain.step_utils import split_batch


def test_nonfinite_steps_are_skipped_counted_and_abort_when_persistent():
    g = Guards(max_consecutive_skips=2)
    assert not g.check_nonfinite(2.0, 1.0, 1)
    assert g.check_nonfinite(float("nan"), 1.0, 2)
    assert g.check_nonfinite(1.0, float("inf"), 3)
    assert not g.check_nonfinite(1.0, 1.0, 4) and g.skipped_total == 2 and g.consecutive == 0
    g.check_nonfinite(float("nan"), 1.0, 5)
    g.check_nonfinite(float("nan"), 1.0, 6)
    with pytest.raises(NonFiniteError, match="consecutive"):
        g.check_nonfinite(float("nan"), 1.0, 7)


def test_spike_detector_uses_running_mean_and_limits_rollbacks():
    rng = random.Random(0)
    g = Guards(spike_threshold=1.5, spike_window=5, max_rollbacks=1)
    losses = [3.0 + 0.1 * rng.random() for _ in range(5)]
    assert not any(g.is_spike(x) for x in losses)  # fills the window
    assert not g.is_spike(1.4 * sum(losses) / 5)  # below threshold: accepted
    assert g.is_spike(10.0)  # spike: roll back
    assert not g.is_spike(10.0)  # rollback budget used: accepted
    sd = g.state_dict()
    g2 = Guards(spike_threshold=1.5, spike_window=5)
    g2.load_state_dict(sd)
    assert list(g2.window) == list(g.window) and g2.skipped_total == g.skipped_total
    assert not Guards(spike_threshold=0.0).is_spike(1e9)  # disabled


def test_metrics_truncate_on_resume_ignores_torn_line_and_plots(tmp_path):
    p = tmp_path / "metrics.jsonl"
    recs = [{"step": i, "loss": 5.0 - 0.1 * i + random.random() * 1e-3, "lm_loss": 4.0} for i in range(1, 8)]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 8, "lo')  # kill -9 mid-line
    assert [r["step"] for r in read_metrics(p)] == list(range(1, 8))
    truncate_after(p, 4)
    assert [r["step"] for r in read_metrics(p)] == [1, 2, 3, 4]
    png = plot_losses(p, tmp_path / "loss.png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preemption_flag_set_by_sigusr1_and_sigterm():
    h = PreemptionHandler().install()
    try:
        assert not h.requested(collective=False)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert h.requested(collective=False) and h.signum == signal.SIGUSR1
        h.signum = None
        os.kill(os.getpid(), signal.SIGTERM)
        assert h.requested(collective=False) and h.signum == signal.SIGTERM
    finally:
        h.restore()
    assert (
        signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler)
        or signal.getsignal(signal.SIGTERM) is not h._handle
    )


def test_split_batch_follows_the_contract():
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(2), "little"))
    tokens = torch.randint(0, 100, (3, 9), generator=g)
    doc = torch.sort(torch.randint(0, 3, (3, 9), generator=g), dim=1).values.int()
    b = split_batch({"tokens": tokens, "doc_ids": doc}, torch.device("cpu"))
    assert torch.equal(b["input_ids"], tokens[:, :-1]) and torch.equal(b["labels"], tokens[:, 1:])
    assert torch.equal(b["mtp_labels"][:, :-1], tokens[:, 2:]) and (b["mtp_labels"][:, -1] == -100).all()
    assert torch.equal(b["doc_ids"], doc[:, :-1])
    with pytest.raises(ValueError, match="seq_len \\+ 1"):
        split_batch({"tokens": tokens, "doc_ids": doc[:, :-1]}, torch.device("cpu"))


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--config", "tiny", "train.stepz=3"], "did you mean 'steps'"),
        (["--config", "tinny"], "did you mean 'tiny'"),
        (["--config", "tiny", "train.steps=abc"], "expected an integer"),
        (["--config", "tiny", "trainsteps"], "section.key=value"),
        (["--config", "tiny", "parallel.ep=3"], "ep*etp = 3*1 = 3 must divide world/pp = 1"),
        (["--config", "tiny", "train.global_batch=6", "train.micro_batch=4"], "not divisible by train.micro_batch=4"),
    ],
)
def test_config_and_layout_errors_exit_2_with_a_clear_message(args, msg, capsys):
    from pretrain.__main__ import main

    assert main(args) == 2
    assert msg in capsys.readouterr().err


def test_lr_is_finite_everywhere():
    from pretrain.config import load_config
    from pretrain.schedules import Schedules

    cfg = load_config("tiny")
    s = Schedules(cfg.train, dp=2)
    assert all(math.isfinite(s.lr(k)[0]) and s.lr(k)[0] > 0 for k in range(cfg.train.steps))
