"""Helpers for the Triton kernel tests: run compiled on CUDA, else through Triton's CPU interpreter.

``triton.jit`` (and Triton's own ``triton.language`` helpers) read ``TRITON_INTERPRET`` when a kernel is
*defined*, so the variable must be set before ``triton`` and the kernel modules are imported. When a test
process imported them earlier without it, they are dropped from ``sys.modules`` and imported afresh.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType


def setup() -> bool:
    """Select the mode for this process; returns True when the kernels run compiled on a CUDA GPU."""
    import torch

    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    if not on_gpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        stale = [
            m
            for m in sys.modules
            if (m == "triton" or m.startswith("triton."))
            and not m.startswith("triton._C")
            or (m.startswith("ops.triton.") and m != __name__)
        ]
        for m in stale:
            del sys.modules[m]
    return on_gpu


def poison_outputs():
    """Body of the Triton tests' autouse fixture: kernels fill their outputs with NaN (indices with a
    negative sentinel) before writing, so an element a kernel never writes fails the comparison.
    Use as ``_poison = pytest.fixture(autouse=True)(testing.poison_outputs)``."""
    import ops.triton

    ops.triton.POISON = True
    try:
        yield
    finally:
        ops.triton.POISON = False


def attention_fwd_bwd(fn, args, kw, window, scale, seed):
    """Run a ``hybrid_attention`` implementation on fresh leaf copies of ``args`` (q, kv, sinks) and of
    ``kw["comp_kv"]``, back-propagate seeded random gradients on BOTH outputs (o and lse); returns
    ((o, lse), [dq, dkv, dsinks] + [dcomp_kv] when present)."""
    import torch

    args = [a.detach().clone().requires_grad_() for a in args]
    kw = dict(kw)
    if "comp_kv" in kw:
        kw["comp_kv"] = kw["comp_kv"].detach().clone().requires_grad_()
    o, lse = fn(*args, scale, window, **kw)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(o.shape, generator=g).to(o.device, o.dtype)
    glse = torch.randn(lse.shape, generator=g).to(lse.device, lse.dtype)
    torch.autograd.backward((o, lse), (go, glse))
    grads = [a.grad for a in args] + ([kw["comp_kv"].grad] if "comp_kv" in kw else [])
    return (o, lse), grads


def kernels(name: str) -> ModuleType:
    """Import kernel module ``ops.triton.<name>`` in this process's mode (interpreted or compiled)."""
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    mod = importlib.import_module(f"ops.triton.{name}")
    kern = next(v for k, v in vars(mod).items() if k.endswith("_kernel"))
    if (type(kern).__name__ == "InterpretedFunction") != interp:
        mod = importlib.reload(mod)
    return mod


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64; fails on any non-finite element of ``a`` (unwritten poisoned output)."""
    a, b = a.double(), b.double()
    assert bool(a.isfinite().all()), "non-finite (unwritten) elements in the Triton result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
