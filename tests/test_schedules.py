"""V4 schedules: LR warm-up/constant/cosine, batch ramp, seq-len stages, attention phases, MTP lambda."""

import math
import random

import pytest

from pretrain.config import TrainConfig
from pretrain.schedules import Schedules


def _cfg(**kw):
    base = dict(steps=100, lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, decay_start=0.6, global_batch=16, micro_batch=2)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_warmup_constant_cosine_endpoints():
    s = Schedules(_cfg())
    assert s.lr(0) == (pytest.approx(1e-4), "warmup")
    assert s.lr(9) == (pytest.approx(1e-3), "warmup")
    assert s.lr(10) == (pytest.approx(1e-3), "constant")
    assert s.lr(59) == (pytest.approx(1e-3), "constant")
    assert s.lr(60) == (pytest.approx(1e-3), "decay")  # cosine starts at the peak
    assert s.lr(99) == (pytest.approx(1e-4), "decay")  # ... and ends at 0.1x at the last step
    mid = 60 + (99 - 60) / 2
    assert s.lr(int(mid))[0] < 1e-3
    # cosine is monotone non-increasing during decay and matches the closed form
    vals = [s.lr(k)[0] for k in range(60, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    k = random.Random(0).randrange(61, 99)
    frac = (k - 60) / 39
    assert s.lr(k)[0] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * frac)))


def test_mtp_lambda_switches_when_decay_starts():
    s = Schedules(_cfg(mtp_lambda=0.3, mtp_lambda_decay=0.1))
    assert s.at(59).mtp_lambda == 0.3 and s.at(60).mtp_lambda == 0.1


def test_batch_ramp_rounds_to_micro_batch_times_dp():
    s = Schedules(_cfg(batch_ramp_steps=10, batch_ramp_start=4, global_batch=32, micro_batch=2), dp=2)
    seen = [s.global_batch(k) for k in range(12)]
    assert seen[0] == 4 and seen[10] == 32 and seen[11] == 32
    assert all(g % 4 == 0 and 4 <= g <= 32 for g in seen)
    assert all(a <= b for a, b in zip(seen, seen[1:]))
    assert s.at(0).micro_batches == 1 and s.at(10).micro_batches == 8


def test_seq_len_stages_and_attention_phases():
    s = Schedules(
        _cfg(seq_len=64, seq_len_stages=[[50, 256], [20, 128]], dense_attention_steps=30, indexer_warmup_steps=5),
        default_attention_mode="sparse",
    )
    assert s.seq_len(0) == (64, 0) and s.seq_len(20) == (128, 1) and s.seq_len(49) == (128, 1)
    assert s.seq_len(50) == (256, 2)
    assert s.attention_mode(29) == "dense" and s.attention_mode(30) == "indexer_warmup"
    assert s.attention_mode(35) == "sparse"
    assert s.at(32).bias_update_rate == 0.0 and s.at(36).bias_update_rate == 0.001
    # without phases the model config's mode is used
    assert Schedules(_cfg(), default_attention_mode="dense").attention_mode(99) == "dense"


def test_bad_schedule_inputs_are_named():
    with pytest.raises(ValueError, match="micro_batch\\*dp"):
        Schedules(_cfg(global_batch=6, micro_batch=2), dp=2)
    with pytest.raises(ValueError, match="seq_len_stages\\[0\\]"):
        Schedules(_cfg(seq_len_stages=[[5]]))


def test_changed_keys_detects_schedule_edits():
    a = Schedules(_cfg())
    b = Schedules(_cfg(lr=2e-3))
    assert b.changed_keys(a.state_dict()) == ["lr"]
    assert a.changed_keys(a.state_dict()) == []
