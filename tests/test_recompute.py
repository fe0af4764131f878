"""Activation recomputation (``model.recompute``, pretrain.model.recompute): same numbers, fewer saved bytes.

* One forward + backward of the tiny V4 (the shipped ``tiny`` config: sliding/CSA/HCA layers, hash and learned
  routing, 4 mHC streams, MTP; sparse attention with the indexer loss) under none, selective, full and full on
  the first 2 blocks only, from the same weights: the losses, every parameter gradient, the routers'
  expert-bias load counters and per-forward results (balance losses, loads, indexer losses) are EQUAL — bit for
  bit: a recompute runs the same fp32 ops on the same inputs on CPU, so there is nothing to round
  differently; any tolerance would only hide a real difference. The load counters are also checked against the
  exact token count (B·S·K per learned router), which catches a double count even if every mode had it.
  The weights come from a fresh random seed every run (logged), and every tensor that V4 initialises to a
  constant (sinks, mHC biases/gates, norms, position biases, expert biases) is randomised too.
* Memory, deterministically: the bytes of the distinct tensors the forward saves for backward (a
  ``saved_tensors_hooks`` pack hook; a checkpointed region shows up as the inputs it keeps), parameters
  excluded. full < selective < none by clear margins.
* 2 ranks (slow): pipeline parallel pp2 through megatron's 1F1B schedule with 2 micro-batches: recompute=full
  gives the same gradients, losses and expert loads as none under that layout (bit-identical).
* The config rejects an unknown mode, naming it and the allowed ones.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import time
from unittest import mock

import pytest
import torch

from pretrain.config import ConfigError, ModelConfig, load_config
from tests.harness import run_ranks

log = logging.getLogger(__name__)

MODES = {
    "none": ["model.recompute=none"],
    "selective": ["model.recompute=selective"],
    "full": ["model.recompute=full"],
    "full_first2": ["model.recompute=full", "model.recompute_num_layers=2"],
}
B, S = 2, 64
BALANCE_COEFF = 1e-2


def _tiny(overrides: list[str]) -> ModelConfig:
    return load_config("tiny", overrides).model


def _randomise_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and the expert biases from ``seed``: no tensor left at its constant init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.02 if p.dim() >= 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 1e-2)


def _batch(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (B, S + 2), generator=g)
    doc = torch.zeros(B, S, dtype=torch.int32)
    doc[:, S // 3 :] = 1  # two documents per row
    return {"input_ids": tokens[:, :-2], "labels": tokens[:, 1:-1], "mtp_labels": tokens[:, 2:], "doc_ids": doc}


def _step(mode: str, state: dict, batch: dict) -> dict:
    """One forward + backward of the tiny model under ``mode`` from ``state``; everything to compare."""
    from ops import dispatch
    from pretrain.model.attention import V4Attention
    from pretrain.model.mhc import HyperConnection
    from pretrain.model.transformer import DeepSeekV4Model

    model = DeepSeekV4Model(_tiny(MODES[mode]), balance_loss_coeff=BALANCE_COEFF).train()
    model.load_state_dict(state)
    calls: collections.Counter = collections.Counter()
    with contextlib.ExitStack() as stack:  # count the forwards of the regions (recomputes included)
        for cls, name in ((V4Attention, "forward"), (V4Attention, "_core_attention"), (HyperConnection, "pre")):
            stack.enter_context(_counting(cls, name, calls))
        select = dispatch._registry["indexer_select"]  # every backend of the top-k selection, counted
        stack.enter_context(mock.patch.dict(select, {k: _counted(f, "select", calls) for k, f in select.items()}))
        out = model(
            batch["input_ids"],
            doc_ids=batch["doc_ids"],
            labels=batch["labels"],
            mtp_labels=batch["mtp_labels"],
            mtp_lambda=0.3,
        )
        out["loss"].backward()
    routers = dict(model.routers())
    return {
        "modes": [blk.recompute for blk in _blocks(model)],
        "calls": (calls["forward"], calls["_core_attention"], calls["pre"]),
        "selections": calls["select"],
        "losses": {k: v.detach().clone() for k, v in out.items()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "no_grad": sorted(n for n, p in model.named_parameters() if p.grad is None),
        "counters": {
            n: r.local_tokens_per_expert.clone()
            for n, r in routers.items()
            if getattr(r, "local_tokens_per_expert", None) is not None
        },
        "topk": {n: r.topk for n, r in routers.items()},
        "loads": {n: r.tokens_per_expert.clone() for n, r in routers.items()},
        "balance": {n: r.balance_loss.detach().clone() for n, r in routers.items() if r.balance_loss is not None},
        "indexer": {
            i: blk.self_attn.indexer_loss.detach().clone()
            for i, blk in enumerate(_blocks(model))
            if blk.self_attn.indexer_loss is not None
        },
    }


def _counted(fn, name: str, calls: collections.Counter):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def _counting(cls: type, name: str, calls: collections.Counter):
    orig = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        calls[name] += 1
        return orig(self, *args, **kwargs)

    return mock.patch.object(cls, name, wrapper)


def _blocks(model) -> list:
    return list(model.layers.values()) + ([model.mtp.block] if model.mtp is not None else [])


def _assert_same(got: dict, ref: dict, what: str) -> None:
    assert set(got) == set(ref), f"{what}: different keys {set(got) ^ set(ref)}"
    for k, v in ref.items():
        assert torch.equal(got[k], v), f"{what} {k}: max |diff| {float((got[k].double() - v.double()).abs().max()):.3e}"


def test_same_loss_grads_and_loads(one_rank_per_test):
    from pretrain.model.transformer import DeepSeekV4Model

    seed = int.from_bytes(os.urandom(4), "little")
    log.info("test_same_loss_grads_and_loads: seed %d (set it here to replay a failure)", seed)
    cfg = _tiny(MODES["none"])
    base = DeepSeekV4Model(cfg, balance_loss_coeff=BALANCE_COEFF)
    _randomise_(base, seed)
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in base.state_dict().items()}
    batch = _batch(cfg.vocab_size, seed)
    res = {m: _step(m, state, batch) for m in MODES}
    ref = res["none"]
    n_blocks = cfg.num_layers + cfg.num_mtp_layers
    assert ref["no_grad"] == [] and len(ref["grads"]) > 100
    assert ref["losses"]["balance_loss"] > 0 and ref["losses"]["indexer_loss"] > 0
    assert len(ref["counters"]) == 4 and len(ref["indexer"]) == 2  # learned: layers 1-3 + MTP; CSA: 1, 3
    for name, c in ref["counters"].items():  # exactly one count per routed token copy
        assert int(c.sum()) == B * S * ref["topk"][name], f"{name}: {int(c.sum())} loads for {B * S} tokens"
    assert res["none"]["modes"] == ["none"] * n_blocks
    assert res["selective"]["modes"] == ["selective"] * n_blocks
    assert res["full"]["modes"] == ["full"] * n_blocks
    assert res["full_first2"]["modes"] == ["full", "full", "none", "none", "none"]
    # the regions really ran twice (forward + recompute in the backward): (attention forwards, core attention
    # regions, mHC pre) per step; full blocks rerun everything, selective the core attention and the mHC pre
    n = n_blocks
    assert ref["calls"] == (n, n, 2 * n)
    assert res["selective"]["calls"] == (n, 2 * n, 4 * n)
    assert res["full"]["calls"] == (2 * n, 2 * n, 4 * n)
    assert res["full_first2"]["calls"] == (n + 2, n + 2, 2 * (n + 2))
    # the top-k selection runs once per CSA layer and step in every mode: the recompute reuses the first
    # forward's (pretrain.model.recompute.memoized) instead of scoring every visible entry again
    assert {m: r["selections"] for m, r in res.items()} == {m: 2 for m in MODES}
    for mode in ("selective", "full", "full_first2"):
        got = res[mode]
        assert got["no_grad"] == []
        for key in ("losses", "grads", "counters", "loads", "balance", "indexer"):
            _assert_same(got[key], ref[key], f"recompute={mode}: {key}")


def _saved_bytes(mode: str, state: dict, batch: dict) -> int:
    """Bytes of the distinct storages the forward saves for backward (parameters and buffers excluded)."""
    from pretrain.model.transformer import DeepSeekV4Model

    model = DeepSeekV4Model(_tiny(MODES[mode]), balance_loss_coeff=BALANCE_COEFF).train()
    model.load_state_dict(state)
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in weights and st.nbytes() > 0:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(
            batch["input_ids"],
            doc_ids=batch["doc_ids"],
            labels=batch["labels"],
            mtp_labels=batch["mtp_labels"],
            mtp_lambda=0.3,
        )
    out["loss"].backward()  # the graph is usable (and frees what it holds)
    return sum(storages.values())


def test_saved_bytes_full_lt_selective_lt_none(one_rank_per_test):
    from pretrain.model.transformer import DeepSeekV4Model

    cfg = _tiny(MODES["none"])
    torch.manual_seed(11)
    state = DeepSeekV4Model(cfg, balance_loss_coeff=BALANCE_COEFF).state_dict()
    batch = _batch(cfg.vocab_size, 11)
    got = {m: _saved_bytes(m, state, batch) for m in ("none", "selective", "full")}
    print(
        "saved for backward, tiny B=%d S=%d: " % (B, S) + ", ".join(f"{m} {v / 2**20:.2f} MiB" for m, v in got.items())
    )
    log.info("saved bytes: %s", got)
    assert got["selective"] < 0.8 * got["none"], got
    assert got["full"] < 0.5 * got["selective"], got


def test_config_rejects_unknown_mode():
    with pytest.raises(ConfigError, match=r"model\.recompute: 'fulll' is not one of \['none', 'selective', 'full'\]"):
        load_config("tiny", ["model.recompute=fulll"])
    with pytest.raises(ValueError, match=r"model\.recompute='partial' is not one of \['none', 'selective', 'full'\]"):
        ModelConfig(recompute="partial")
    with pytest.raises(ConfigError, match=r"recompute_num_layers=-1 must be >= 0"):
        load_config("tiny", ["model.recompute_num_layers=-1"])
    assert load_config("tiny").model.recompute == "none"


# ------------------------------------------------------------------------------------------------ 2 ranks
LAYOUTS = {
    "pp2": ({"pp": 2}, ("none", "full")),
    "tp2": ({"tp": 2}, ("none", "full")),
    "sp2": ({"sp": 2}, ("none", "selective", "full")),
}


def _rank_grads(rank: int, world: int, layouts: dict) -> dict:
    """Rank function: per layout, one global batch (2 micro-batches) under each mode from the same init;
    mismatches of the gradients, losses and expert loads against recompute=none on this rank."""
    import dataclasses

    from megatron.core import parallel_state as ps

    from parallel import pipeline
    from parallel.process_groups import init_distributed
    from pretrain.config import ParallelConfig
    from pretrain.model.build import build_model
    from pretrain.model.transformer import V4Block
    from pretrain.step_utils import split_batch
    from tests.test_parallel_layouts import make_batches, model_config

    base = model_config()
    batch = make_batches(seed=5)[0][:2]
    out = {}
    for name, (lay, modes) in layouts.items():
        t0 = time.monotonic()
        init_distributed(ParallelConfig(**lay), base)
        seen = {}
        for mode in modes:
            cfg = dataclasses.replace(base, recompute=mode)
            chunks = build_model(cfg, 97, balance_loss_coeff=1e-2, bias_update_rate=1e-3)
            mbs = [split_batch(b, torch.device("cpu")) for b in batch]
            pipeline.zero_grads(chunks)
            losses = pipeline.forward_backward(chunks, mbs, mtp_lambda=0.3)
            pipeline.finalize_grads(chunks)
            seen[mode] = {
                "losses": {k: torch.tensor(v, dtype=torch.float64) for k, v in losses.items()},
                "grads": {n: p.grad.clone() for c in chunks for n, p in c.named_parameters() if p.grad is not None},
                "loads": {
                    n: b.clone() for c in chunks for n, b in c.named_buffers() if n.endswith("local_tokens_per_expert")
                },
                "modes": sorted({m.recompute for c in chunks for m in c.modules() if isinstance(m, V4Block)}),
            }
        bad = []
        ref = seen["none"]
        for mode in modes[1:]:
            got = seen[mode]
            if got["modes"] != [mode]:
                bad.append(f"{mode}: blocks run {got['modes']}")
            for key in ("losses", "grads", "loads"):
                if set(got[key]) != set(ref[key]) or not ref[key]:
                    bad.append(f"{mode} {key}: names differ or empty")
                    continue
                for k, v in ref[key].items():
                    if not torch.equal(got[key][k], v):
                        bad.append(
                            f"{mode} {key} {k}: max |diff| {float((got[key][k].double() - v.double()).abs().max()):.3e}"
                        )
        out[name] = {"bad": bad, "n_grads": len(ref["grads"]), "seconds": time.monotonic() - t0}
        ps.destroy_model_parallel()
    return out


@pytest.mark.slow
def test_two_ranks_full_equals_none():
    """pp2 (1F1B, 2 micro-batches) and sp2 (Ulysses): recompute gives the same gradients, losses and loads as
    none on every rank — bit-identical, the same ops on the same inputs in the same order."""
    res = run_ranks(_rank_grads, 2, LAYOUTS, timeout=300)
    for rank, r in enumerate(res):
        for name, v in r.items():
            assert v["n_grads"] > 10, f"rank {rank} {name}: no gradients"
            assert not v["bad"], f"rank {rank} {name}: " + "; ".join(v["bad"][:10])
            log.info("rank %d %s: %.1f s", rank, name, v["seconds"])
    print("2-rank layouts, seconds on rank 0:", {k: round(v["seconds"], 1) for k, v in res[0].items()})


def test_dry_run_accounts_for_recompute():
    """The planner's per-block estimate (pretrain.dry_run) shrinks none > selective > full, the peak adds one
    block's working set, and the output names the setting it assumed."""
    import dataclasses

    from pretrain.config import ParallelConfig
    from pretrain.dry_run import COMPARE, layer_activation_bytes_per_token, plan, render, render_comparison
    from tests.test_parallel_layouts import model_config

    cfg = model_config()
    per = {
        m: layer_activation_bytes_per_token(cfg, "csa", 1, 1, cfg.index_topk, m) for m in ("none", "selective", "full")
    }
    assert per["full"] == 4 * cfg.hc_mult * cfg.hidden_size  # the fp32 stream state X only
    assert per["full"] < per["selective"] < per["none"]
    cfg = dataclasses.replace(cfg, recompute="full", recompute_num_layers=1)
    layout, rows = plan(cfg, 2, ParallelConfig(pp=2), micro_batch=1, seq_len=32, global_batch=4, settings=COMPARE)
    for r in rows:  # rank 0 holds 2 micro-batches at its peak, the last rank 1: its recompute saves nothing
        act = {s[0] if not s[1] else "first1": v for s, v in r.act.items()}
        assert act["full"] < act["first1"] and act["selective"] < act["none"], act
        assert act["first1"] < act["none"] if r.pp_rank == 0 else act["first1"] <= act["none"], act
        assert r.act_bytes == act["first1"]
    text = render("tiny", cfg, layout, rows, 1, 32, 4)
    assert "recompute=full on the first 1 blocks per chunk" in text and "total GiB, recompute=none" in text
    summary = render_comparison([("tiny", layout, rows)], 141.0)
    assert "full on the first 1 blocks per chunk (config)" in summary
    assert all(re.search(rf"\|\s*{m}\s*\|", summary) for m in ("none", "selective", "full")), summary
