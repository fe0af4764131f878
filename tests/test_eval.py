"""Validation during training (``train.eval_interval``; pretrain.evaluate, data_pipeline.validation).

Fast: :func:`data_pipeline.validation.validation_batches` on a small MDS dataset written here (the first n
samples of each held-out split, in order; the clear error for a dataset without a split);
:func:`pretrain.evaluate.eval_microbatches` (every held-out row exactly once over the data-parallel ranks,
equal micro-batch counts, padding ignored); the config keys; loss.png with the validation curve.

Slow (the trainer end to end on the tiny config, 3 steps, validation at steps 2 and 3 = the last; 5 held-out
samples per source so that the rows split unevenly over two data-parallel ranks and need padding):

- ``val_loss`` and ``val_loss/<source>`` present at those steps only, finite, one per dataset source;
- evaluation on vs off: every training number of every step bit-identical (one process, and pp2 × vpp2 whose
  interleaved schedule runs between the training steps);
- tp2, pp2, pp2 × vpp2, ep2 (dp2 for the dense part) and sp2 give the one-process val_loss within 1e-5 relative
  (the training tolerance of tests/test_train_layouts.py, whose docstring derives it: the layouts sum the same
  fp32 terms in another order, ~1e-7 relative per loss; the weights after 2-3 steps differ by as much);
- ``python -m pretrain.evaluate`` on the step-3 checkpoint gives the value the trainer logged (one process,
  the same micro-batches in the same order; 1e-6 relative for a different kernel path, measured equal);
- kill -9 mid-run with evaluation on, 2 ranks (ep2): the rerun continues bit-exactly (losses and val_loss).

The dataset with its held-out split comes from tests/validation_split.py (the pipeline's own split).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.harness import run_command, run_ranks

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)

STEPS = 3
EVAL_STEPS = (2, 3)
SAMPLES = 5
TOL = 1e-5
BASE = [
    "train.seq_len=32",
    "train.global_batch=4",
    "train.micro_batch=2",
    "train.warmup_steps=2",
    f"train.steps={STEPS}",
    "train.eval_interval=0",
    "checkpoint.interval=0",
    "run.tensorboard=false",
    "run.progress=false",
    "run.plot=false",
]
EVAL = ["train.eval_interval=2", f"train.eval_samples={SAMPLES}"]
TWO_RANK = {
    "tp2": ["parallel.tp=2", *EVAL],
    "pp2": ["parallel.pp=2", *EVAL],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2", *EVAL],
    "pp2_vpp2_off": ["parallel.pp=2", "parallel.vpp=2"],
    "ep2": ["parallel.ep=2", *EVAL],
    "sp2": ["parallel.sp=2", *EVAL],
}
ONE_RANK = {"one": [*EVAL, "checkpoint.interval=3", "run.plot=true"], "one_off": []}
TRAIN_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "expert_load_cv", "skipped")


# --------------------------------------------------------------------------------------------- fast
def _write_source(path: Path, rows: np.ndarray, starts: list[np.ndarray]) -> None:
    from data_pipeline.pack import MDS_COLUMNS
    from data_pipeline.streaming_compat import import_streaming

    streaming = import_streaming()
    with streaming.MDSWriter(
        out=str(path), columns=MDS_COLUMNS, compression="zstd", hashes=["xxh64"], size_limit=1 << 12
    ) as w:  # small shards: samples span several of them
        for r, s in zip(rows, starts):
            w.write({"tokens": r.astype(np.int32), "doc_starts": s.astype(np.int32)})


def _dataset(tmp_path: Path, rng: np.random.Generator, seq_len: int, sizes: dict[str, int], split: bool = True):
    from data_pipeline.manifest import MANIFEST_VERSION, write_manifest

    written = {}
    for name, n in sizes.items():
        rows = rng.integers(0, 500, size=(n, seq_len + 1))
        starts = [
            np.unique(np.concatenate([[0], rng.integers(1, seq_len + 1, size=rng.integers(0, 4))])) for _ in range(n)
        ]
        _write_source(tmp_path / "validation" / name, rows, starts)
        written[name] = (rows, starts)
    m = {"version": MANIFEST_VERSION, "seq_len": seq_len, "sample_len": seq_len + 1, "sources": {}}
    if split:
        m["validation"] = {
            n: {"dir": f"validation/{n}", "samples": k, "documents": 0, "tokens": 0} for n, k in sizes.items()
        }
    return write_manifest(tmp_path, m), written


def test_validation_batches_are_the_first_samples_in_order(tmp_path):
    from data_pipeline.pack import doc_ids_from_starts
    from data_pipeline.validation import validation_batches

    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(8, 40))
    sizes = {"a": int(rng.integers(20, 60)), "b": 3}
    manifest, written = _dataset(tmp_path, rng, seq_len, sizes)
    want = int(rng.integers(4, 20))
    got = validation_batches(manifest, seq_len, want)
    assert list(got) == ["a", "b"], seed
    for name, b in got.items():
        rows, starts = written[name]
        n = min(want, sizes[name])  # "b" has fewer: all of them
        assert b["tokens"].dtype == np.int64 and b["doc_ids"].dtype == np.int32
        assert b["tokens"].shape == b["doc_ids"].shape == (n, seq_len + 1), seed
        np.testing.assert_array_equal(b["tokens"], rows[:n])
        for i in range(n):
            np.testing.assert_array_equal(b["doc_ids"][i], doc_ids_from_starts(starts[i], seq_len + 1))
    again = validation_batches(tmp_path, seq_len, want)  # a directory works too; fixed samples
    for name in got:
        np.testing.assert_array_equal(again[name]["tokens"], got[name]["tokens"])
    with pytest.raises(ValueError, match=f"seq_len {seq_len}"):
        validation_batches(manifest, seq_len + 1, want)


def test_dataset_without_a_validation_split_is_a_clear_error(tmp_path):
    from data_pipeline.validation import NoValidationSplit, validation_batches

    manifest, _ = _dataset(tmp_path, np.random.default_rng(), 8, {"a": 4}, split=False)
    with pytest.raises(NoValidationSplit) as e:
        validation_batches(manifest, 8, 4)
    assert str(manifest) in str(e.value) and "rebuild" in str(e.value)


def test_eval_microbatches_cover_every_row_once():
    import torch

    from pretrain.evaluate import IGNORE_INDEX, eval_microbatches, token_counts

    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        L = int(rng.integers(3, 12))
        sizes = rng.integers(1, 12, size=int(rng.integers(1, 4)))
        batches = {
            f"s{i}": {
                "tokens": rng.integers(0, 100, size=(n, L)),
                "doc_ids": np.sort(rng.integers(0, 3, size=(n, L)), axis=1).astype(np.int32),
            }
            for i, n in enumerate(sizes)
        }
        dp, mb, mult = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
        per_rank = [eval_microbatches(batches, mb, r, dp, mult) for r in range(dp)]
        assert len({len(x) for x in per_rank}) == 1 and len(per_rank[0]) % mult == 0, seed
        for s, (name, b) in enumerate(batches.items()):
            rows, count = [], 0
            for r in range(dp):
                for src, mbatch, n in per_rank[r]:
                    assert mbatch["input_ids"].shape == (mb, L - 1)
                    if src != s:
                        continue
                    real = (mbatch["labels"] != IGNORE_INDEX).all(dim=1)
                    assert ((mbatch["labels"] == IGNORE_INDEX).all(dim=1) | real).all()
                    assert n == int(real.sum()) * (L - 1)
                    count += n
                    rows += [
                        (torch.cat([mbatch["input_ids"][i], mbatch["labels"][i, -1:]]), mbatch["doc_ids"][i])
                        for i in range(mb)
                        if real[i]
                    ]
            assert torch.equal(torch.stack([t for t, _ in rows]), torch.as_tensor(b["tokens"])), (seed, name)
            assert torch.equal(torch.stack([d for _, d in rows]), torch.as_tensor(b["doc_ids"][:, :-1])), seed
            assert count == token_counts(batches)[s]


def test_eval_config_keys_are_checked():
    from pretrain.config import ConfigError, load_config

    cfg = load_config("tiny", ["train.eval_interval=7", "train.eval_samples=3"])
    assert (cfg.train.eval_interval, cfg.train.eval_samples) == (7, 3)
    with pytest.raises(ConfigError, match="eval_interval"):
        load_config("tiny", ["train.eval_interval=-1"])
    with pytest.raises(ConfigError, match="eval_samples"):
        load_config("tiny", ["train.eval_interval=5", "train.eval_samples=0"])
    with pytest.raises(ConfigError, match="did you mean 'eval_interval'"):
        load_config("tiny", ["train.eval_intervall=5"])


def test_loss_plot_shows_the_validation_curve(tmp_path):
    from pretrain.metrics import plot_losses

    rng = np.random.default_rng()
    recs = [{"step": s, "loss": float(rng.uniform(2, 9)), "lm_loss": float(rng.uniform(2, 9))} for s in range(1, 11)]
    for r in recs[4::5]:
        r.update({"val_loss": float(rng.uniform(2, 9)), "val_loss/a": 1.0, "val_loss/b": 2.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    import matplotlib.pyplot as plt

    created = []
    orig = plt.Axes.plot

    def spy(self, *a, **k):
        created.append(k.get("label"))
        return orig(self, *a, **k)

    plt.Axes.plot = spy
    try:
        assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png") == tmp_path / "loss.png"
    finally:
        plt.Axes.plot = orig
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "validation LM loss" in created and "validation: a" in created and "validation: b" in created


# --------------------------------------------------------------------------------------------- slow
def train_runs(rank: int, world: int, root: str, shards: str, runs: list[tuple[str, list[str]]]) -> dict:
    """Rank function (tests/harness.py): each run in turn on the tiny config; rank 0's metrics records."""
    from parallel.process_groups import init_distributed
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    out = {}
    for key, over in runs:
        t0 = time.monotonic()
        cfg = load_config("tiny", [*BASE, f"data.shards_dir={shards}", f"run.dir={Path(root) / key}", *over])
        res = Trainer(cfg, init_distributed(cfg.parallel, cfg.model)).fit()
        recs = [json.loads(x) for x in (Path(root) / key / "metrics.jsonl").read_text().splitlines()]
        out[key] = {
            "exit": res.exit_code,
            "records": {r["step"]: r for r in recs} if rank == 0 else None,
            "last_val": res.last_val,
            "seconds": time.monotonic() - t0,
        }
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from tests.validation_split import shards_dir_with_validation

    return str(shards_dir_with_validation(tmp_path_factory.mktemp("val_shards")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards) -> dict:
    root = str(tmp_path_factory.mktemp("eval_runs"))
    res = run_ranks(train_runs, 1, root, shards, list(ONE_RANK.items()), timeout=600)[0]
    res.update(run_ranks(train_runs, 2, root, shards, list(TWO_RANK.items()), timeout=1200)[0])
    for k, v in res.items():
        log.info("%s: %.1f s", k, v["seconds"])
        assert v["exit"] == 0, k
    res["root"] = root
    return res


def _sources(shards: str) -> list[str]:
    from data_pipeline.manifest import read_manifest

    (manifest,) = Path(shards).glob("*/s32-*/manifest.json")
    return list(read_manifest(manifest)[1]["validation"])


@pytest.mark.slow
def test_val_loss_present_finite_and_per_source(runs, shards):
    recs = runs["one"]["records"]
    sources = _sources(shards)
    assert sorted(recs) == list(range(1, STEPS + 1)) and len(sources) >= 2
    for s, r in recs.items():
        if s not in EVAL_STEPS:
            assert not any(k.startswith("val_") for k in r), (s, r)
            continue
        per = [r[f"val_loss/{n}"] for n in sources]
        assert sorted(k for k in r if k.startswith("val_loss/")) == sorted(f"val_loss/{n}" for n in sources)
        assert all(math.isfinite(v) and 0 < v < 20 for v in [r["val_loss"], *per]), r
        # equal samples per source: the token mean over all of them is the mean of the sources' losses
        assert r["val_loss"] == pytest.approx(sum(per) / len(per), rel=1e-12)
    assert recs[3]["val_loss"] != recs[2]["val_loss"]  # the weights changed in between
    assert runs["one"]["last_val"]["step"] == STEPS
    assert runs["one"]["last_val"]["val_loss"] == recs[STEPS]["val_loss"]
    assert (Path(runs["root"]) / "one" / "loss.png").is_file()
    assert json.loads((Path(runs["root"]) / "one" / "dataset.json").read_text())["manifests"]["32"].startswith(shards)


@pytest.mark.slow
@pytest.mark.parametrize("on,off", [("one", "one_off"), ("pp2_vpp2", "pp2_vpp2_off")])
def test_training_is_bit_identical_with_evaluation_on_and_off(runs, on, off):
    a, b = runs[on]["records"], runs[off]["records"]
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for s in a:
        for k in TRAIN_KEYS:
            assert a[s][k] == b[s][k], f"{on} vs {off}, step {s} {k}: {a[s][k]!r} != {b[s][k]!r}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "pp2_vpp2", "ep2", "sp2"])
def test_layout_val_loss_equals_one_process(runs, shards, layout):
    got, want = runs[layout]["records"], runs["one"]["records"]
    keys = ["val_loss", *(f"val_loss/{n}" for n in _sources(shards))]
    worst = 0.0
    for s in EVAL_STEPS:
        for k in keys:
            rel = abs(got[s][k] - want[s][k]) / abs(want[s][k])
            worst = max(worst, rel)
            assert rel <= TOL, f"{layout} step {s} {k}: {got[s][k]!r} vs one process {want[s][k]!r}"
    log.info("%s: largest relative val_loss difference to one process %.1e", layout, worst)


@pytest.mark.slow
def test_evaluate_command_matches_the_trainers_value(runs):
    run = Path(runs["root"]) / "one"
    r = run_command(
        [sys.executable, "-m", "pretrain.evaluate", "--run-dir", str(run), "--step", str(STEPS)], timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert (
        "source" in r.stdout
        and rec["step"] == STEPS
        and rec["samples"] == {k.split("/", 1)[1]: SAMPLES for k in rec if k.startswith("val_loss/")}
    )
    want = runs["one"]["records"][STEPS]
    for k, v in rec.items():
        if k.startswith("val_loss"):
            assert v == pytest.approx(want[k], rel=1e-6), k
    r = run_command([sys.executable, "-m", "pretrain.evaluate", "--run-dir", str(run), "--step", "7"], timeout=120)
    assert r.returncode == 2 and "step_00000007" in r.stderr


@pytest.mark.slow
def test_kill9_resume_is_bit_exact_with_evaluation_two_ranks(tmp_path, shards):
    from tests.test_train_resume import _cmd, _start_and_signal

    extra = [
        "train.steps=6",
        "checkpoint.interval=2",
        "parallel.ep=2",
        "train.eval_interval=2",
        f"train.eval_samples={SAMPLES}",
    ]

    def records(run: Path) -> dict[int, dict]:
        return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    ref = tmp_path / "ref"
    r = run_command(_cmd(ref, shards, extra, 2))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "val loss" in r.stderr  # the end-of-run summary
    run = tmp_path / "killed"
    code, out = _start_and_signal(
        _cmd(run, shards, [*extra, "train.fault_inject_pause_step=3"], 2),
        run,
        signal.SIGKILL,
        after_step=3,
        need_ckpt=True,
    )
    assert code in (-signal.SIGKILL, 128 + signal.SIGKILL), out[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    r = run_command(_cmd(run, shards, extra, 2))
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-4000:]
    want, got = records(ref), records(run)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for s in want:
        for k in (*TRAIN_KEYS, *(k for k in want[s] if k.startswith("val_loss"))):
            assert got[s].get(k) == want[s][k], f"step {s} {k}: {got[s].get(k)!r} vs uninterrupted {want[s][k]!r}"
    assert [s for s in want if "val_loss" in want[s]] == [2, 4, 6]
