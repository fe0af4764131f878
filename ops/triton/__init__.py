"""Triton kernels for the V4 ops, registered as the ``triton`` backend of ``ops.dispatch``.

One module per kernel:

* ``mhc_pre``            — mHC pre side: 24-wide RMS projection + sigmoid + Sinkhorn + stream collapse, fused
                           (also ``sinkhorn`` alone and ``hc_head``), Triton backward (Sinkhorn recomputed).
* ``mhc_post``           — mHC post side: X_new = post ⊗ o + combᵀ X, forward and backward.
* ``newton_schulz``      — batched Muon Newton-Schulz with symmetric (one-triangle) Gram kernels.
* ``hybrid_attention``   — joint online softmax over sliding window ∪ compressed entries with sink (fwd+bwd).
* ``compressor``         — per-channel softmax pooling of the KV compressors (fwd+bwd).
* ``indexer``            — lightning-indexer top-k by block-wise merge (forward only): ``indexer_topk`` on
                           given scores, and ``indexer_select`` fusing the scores (no [S, N] tensor).

Importing this package does NOT import ``triton`` and defines no kernel: the registered functions import
their kernel module on first call. That keeps ``import ops`` working without Triton, and lets a test set
``TRITON_INTERPRET=1`` (read by ``triton.jit`` when a kernel is *defined*) before the kernels exist.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

from ops import dispatch

# Tests set this: every output buffer a kernel is meant to fill completely is then allocated filled with NaN
# (integer buffers with -2**30) instead of uninitialised memory, so an element a kernel forgot fails the check.
POISON = False


def new_empty(shape, *, device, dtype):
    """``torch.empty`` for kernel outputs, or a poisoned buffer when ``POISON`` is set."""
    import torch

    if isinstance(shape, int):
        shape = (shape,)
    if not POISON:
        return torch.empty(shape, device=device, dtype=dtype)
    fill = float("nan") if dtype.is_floating_point else -(2**30)
    return torch.full(shape, fill, device=device, dtype=dtype)


# Set by ``ops.triton.sm90check``: the launchers take the Triton path for CPU tensors and every kernel launch is
# compiled for an sm_90 (Hopper) target instead of being run — the compile-only check on a machine without GPU.
COMPILE_ONLY = False


def native(t) -> bool:
    """True when the Triton kernels take tensor ``t``: CUDA, the CPU interpreter, or the compile-only check."""
    import os

    return bool(t.is_cuda or COMPILE_ONLY or os.environ.get("TRITON_INTERPRET", "0") == "1")


# op name -> (kernel module, function)
KERNELS: dict[str, tuple[str, str]] = {
    "sinkhorn": ("mhc_pre", "sinkhorn"),
    "mhc_pre": ("mhc_pre", "mhc_pre"),
    "hc_head": ("mhc_pre", "hc_head"),
    "mhc_post": ("mhc_post", "mhc_post"),
    "newton_schulz": ("newton_schulz", "newton_schulz"),
    "hybrid_attention": ("hybrid_attention", "hybrid_attention"),
    "compressor_pool": ("compressor", "compressor_pool"),
    "indexer_topk": ("indexer", "indexer_topk"),
    "indexer_select": ("indexer", "indexer_select"),
}


def available() -> bool:
    """True when the ``triton`` package is installed (kernels may still need a GPU or the interpreter)."""
    return importlib.util.find_spec("triton") is not None


def load(op: str) -> Callable[..., Any]:
    """The Triton implementation of ``op`` (imports its kernel module, defining the kernels)."""
    mod, fn = KERNELS[op]
    return getattr(importlib.import_module(f"ops.triton.{mod}"), fn)


def _lazy(op: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return load(op)(*args, **kwargs)

    call.__name__ = f"triton_{op}"
    call.__qualname__ = call.__name__
    call.__doc__ = f"Triton implementation of ``{op}`` (module ops.triton.{KERNELS[op][0]}), loaded on first call."
    return call


def indexer_select_reference(q, keys, weights, visible_lo, visible_hi, k):
    """Reference of the fused op ``indexer_select``: ``indexer_topk(indexer_scores(q, keys, weights), lo, hi, k)``."""
    from ops import indexer

    return indexer.indexer_topk(indexer.indexer_scores(q, keys, weights), visible_lo, visible_hi, k)


def register_all() -> None:
    dispatch.register("indexer_select", reference=indexer_select_reference)
    if not available():
        return
    for op, (mod, _) in KERNELS.items():
        if importlib.util.find_spec(f"ops.triton.{mod}") is not None:
            dispatch.register(op, triton=_lazy(op))


register_all()
