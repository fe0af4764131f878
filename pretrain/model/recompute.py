"""Activation recomputation (gradient checkpointing) of the V4 blocks: ``model.recompute`` = none | selective | full.

A recomputed region keeps only its inputs during the forward and runs its forward again in the backward to
rebuild the tensors the backward needs; results and gradients are those of the plain forward (bit-identical on
CPU fp32: the same ops run on the same inputs; ``tests/test_recompute.py``).

* ``none``: every block keeps all its activations (the dry run's ``none`` row).
* ``full``: each :class:`~pretrain.model.transformer.V4Block` (MTP block included) is one region: a block keeps
  only its input stream state X [B, S, n, d] (fp32) and recomputes everything else, at the cost of a second
  forward of the block (≈ +1/3 of the block's compute, and the MoE all-to-alls once more).
* ``selective`` (Megatron-LM's selective recompute idea: recompute what is cheap in FLOPs but large in bytes):
    - the core attention, from the query latent c^Q to the de-rotated output: the q up-projection ``q_b_proj``,
      the per-head RMSNorm, RoPE, the hybrid attention (in the PyTorch reference its [S, H, window + entries]
      score/probability tensors; in the Triton kernel its output o and log-sum-exp) and the inverse RoPE (under
      Ulysses also the two all-to-alls of q and o). It keeps c^Q (d_c per token) and the K=V head (c), which the
      rest of the layer keeps anyway, and drops 4 tensors of n_h·c per token (the widest in the layer: 32768 at
      Flash against d = 4096) plus the softmax statistics, for one d_c × n_h·c matmul and one attention forward;
    - the mHC ``pre`` of both sites (the (2+n)n-row projection, the gates and the 20 Sinkhorn iterations): it keeps
      only X, which ``mhc_post`` keeps anyway, and drops the ~40 Sinkhorn iterates of [n, n] per token and the
      gate intermediates, for a matmul of (2+n)n rows and tiny n×n steps. (The Triton ``mhc_pre`` already
      recomputes Sinkhorn in its backward; with it the saving is small and so is the cost.) ``mhc_post`` is not
      a region: it saves only its inputs (o, X, post, comb), which are kept anyway, so recomputing it frees nothing.
  Not in ``selective``: the MoE (its expert GEMMs are the layer's dominant FLOPs and a recompute repeats the
  token all-to-alls: that is what ``full`` is for), the projections to the latents, the compressor and the
  indexer (small per token).
* ``recompute_num_layers`` = N > 0: only the first N blocks of every pipeline chunk are recomputed (megatron's
  ``recompute_method=block``); the others and the MTP block keep everything. 0 = every block.

Why ``torch.utils.checkpoint(use_reentrant=False)`` and not megatron-core's ``tensor_parallel.checkpoint``:
megatron's ``CheckpointFunction`` is the reentrant kind, whose first forward runs under ``torch.no_grad()``.
Our MoE router builds the V4 sequence-wise balance loss only when grad is enabled and hands it over as a module
attribute (``router.balance_loss``) that the model adds to the loss: under megatron's checkpoint it would be
missing from the loss and from the gradient of every recomputed block (and an attribute of the region cannot
become an output of the checkpoint function). The non-reentrant checkpoint runs the first forward with
grad, keeps the whole autograd graph (only its saved tensors are dropped and recomputed), so values attached
to outputs or stored as attributes stay differentiable, and it also supports ``torch.autograd.grad``. What
megatron's adds over torch's — replaying megatron's model-parallel CUDA RNG tracker states, so dropout and
other random ops inside a region replay identically — is added here through ``context_fn``; the CPU and
CUDA default generators are replayed by torch (``preserve_rng_state``). Tensor-parallel collectives inside a
region simply run again in the recompute on every rank (megatron's checkpoint does the same).

Side effects. A recompute re-runs forward code that also updates module state, once more during the backward:
* ``router.local_tokens_per_expert += loads``: megatron's aux-loss-free expert-bias counter. megatron guards it
  with ``torch.is_grad_enabled()``, which is False in the first forward of its reentrant checkpoint, but True in
  both passes of a non-reentrant one: the loads would be counted twice;
* ``router.balance_loss``, ``router.tokens_per_expert`` and ``attention.indexer_loss``: replaced by tensors of
  the recompute.
The recompute context snapshots these for every submodule of the region when the recompute starts and restores
them when it ends, so a step with recomputation leaves exactly the state of a step without it (without this
the load counters of ``tests/test_recompute.py`` come out exactly doubled under ``full``, in one process and
under pp2; the losses and gradients do not change, they come from the first forward's graph).

Values computed WITHOUT grad inside a region (the indexer's top-k selection, ``memoized``) are kept from the
first forward and reused by the recompute instead of being evaluated again: they are a deterministic function
of the region's inputs, hold no autograd graph, and are small (the selection: k int64 per query against the
O(S²/m) products that make it). Under ``full`` this removes the second scoring of every visible entry, which on
the CPU path was the largest single cost of a long-context step. The memo belongs to one checkpoint call (it
lives as long as that call's recompute can run, and is freed with it), so microbatches in flight under
pipeline parallelism never see each other's selections.

Early stop is off (``early_stop=False``): the recompute always runs the whole region, so every rank issues the
same collectives (TP all-reduces, the EP all-to-alls, the Ulysses all-to-alls) even where the ranks' last saved
tensor falls at different points (experts with no tokens save nothing). Routing must be reproducible
between the forward and its recompute (torch checks the shapes of the recomputed tensors): it is a
deterministic function of the inputs, the weights and the expert bias, which changes only after the step.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.utils.checkpoint
from torch import nn

from pretrain.config import RECOMPUTE_MODES  # noqa: F401 (re-exported)
from pretrain.config import check_recompute_mode as check_mode

log = logging.getLogger(__name__)

__all__ = ["RECOMPUTE_MODES", "checkpoint", "check_mode", "memoized"]

# per-forward results that modules keep as attributes (restored after a recompute)
_RESULT_ATTRS = ("balance_loss", "tokens_per_expert", "indexer_loss")
# counters accumulated over the forwards of a step (restored in place after a recompute)
_COUNTER_ATTRS = ("local_tokens_per_expert",)


_T = TypeVar("_T")
_active = threading.local()  # .stack: the memos of the regions whose forward or recompute is running here


def _memo_stack() -> list["_Memo"]:
    if not hasattr(_active, "stack"):
        _active.stack = []
    return _active.stack


class _Memo:
    """No-grad values of one region's first forward, keyed by (owner, n-th call of that owner in the pass)."""

    def __init__(self) -> None:
        self.values: dict[tuple[int, int], Any] = {}
        self.calls: dict[int, int] = {}
        self.replaying = False

    def begin(self, replaying: bool) -> None:
        self.calls, self.replaying = {}, replaying
        _memo_stack().append(self)

    def end(self) -> None:
        _memo_stack().remove(self)

    def get(self, owner: object, compute: Callable[[], _T]) -> _T:
        n = self.calls.get(id(owner), 0)
        self.calls[id(owner)] = n + 1
        key = (id(owner), n)
        if self.replaying and key in self.values:
            return self.values[key]
        value = compute()
        self.values[key] = value
        return value


def memoized(owner: object, compute: Callable[[], _T]) -> _T:
    """``compute()``, or inside the recompute of a region the value it returned in that region's first forward
    (see the module docstring). ``compute`` must be deterministic and must not need grad; outside a region
    (no recomputation, evaluation) it simply runs."""
    stack = _memo_stack()
    return stack[-1].get(owner, compute) if stack else compute()


def _rng_tracker() -> Any:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def _snapshot(module: Optional[nn.Module]) -> list[tuple[Any, str, Any]]:
    """(module, attribute, value) of every side-effect attribute below ``module`` (counters cloned)."""
    if module is None:
        return []
    saved = []
    for m in module.modules():
        for name in _RESULT_ATTRS:
            if name in m.__dict__:
                saved.append((m, name, m.__dict__[name]))
        for name in _COUNTER_ATTRS:
            value = getattr(m, name, None)
            if isinstance(value, torch.Tensor):
                saved.append((m, name, value.detach().clone()))
    return saved


def _restore(saved: list[tuple[Any, str, Any]]) -> None:
    for m, name, value in saved:
        if name in _COUNTER_ATTRS:
            with torch.no_grad():
                getattr(m, name).copy_(value)
        else:
            setattr(m, name, value)


class _ForwardContext:
    """Entered around the first forward: remembers megatron's model-parallel RNG tracker states."""

    def __init__(self) -> None:
        self.rng_states: dict[str, Any] = {}
        self.memo = _Memo()

    def __enter__(self) -> None:
        self.memo.begin(replaying=False)
        # the tracker replaces a stream's state tensor when it forks (never writes it in place), so a shallow
        # copy of the dict is a snapshot (not true of TE's CUDA-graph-safe generators, which we do not use)
        self.rng_states = dict(_rng_tracker().get_states())

    def __exit__(self, *exc: Any) -> None:
        self.memo.end()


class _RecomputeContext:
    """Entered around every recompute: the forward's tracker states in, the module's side effects undone after.
    Re-entrant across backward passes (``retain_graph``): the state to restore is kept per entry."""

    def __init__(self, forward: _ForwardContext, module: Optional[nn.Module]):
        self.forward, self.module = forward, module
        self._stack: list[tuple[dict[str, Any], list[tuple[Any, str, Any]]]] = []

    def __enter__(self) -> None:
        tracker = _rng_tracker()
        current = dict(tracker.get_states())
        self._stack.append((current, _snapshot(self.module)))
        self.forward.memo.begin(replaying=True)
        if self.forward.rng_states or current:  # no tracker streams (CPU tests): leave it untouched
            tracker.set_states(dict(self.forward.rng_states))

    def __exit__(self, *exc: Any) -> None:
        current, saved = self._stack.pop()
        self.forward.memo.end()
        _restore(saved)
        if current or self.forward.rng_states:
            _rng_tracker().set_states(current)


def checkpoint(fn: Callable[..., Any], *args: Any, state_of: Optional[nn.Module] = None) -> Any:
    """``fn(*args)`` with its activations recomputed in the backward (see the module docstring).

    ``state_of``: the module whose side-effect state (router loads and per-forward losses) the recompute must
    leave untouched; None when ``fn`` has no side effects. Without grad (evaluation) ``fn`` just runs.
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    forward = _ForwardContext()
    recompute = _RecomputeContext(forward, state_of)
    return torch.utils.checkpoint.checkpoint(
        fn,
        *args,
        use_reentrant=False,
        preserve_rng_state=True,
        early_stop=False,
        context_fn=lambda: (forward, recompute),
    )
