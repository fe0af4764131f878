"""One switch that selects the implementation of every op: the PyTorch reference, a blocked PyTorch path or Triton.

Backends:
- ``reference``: the plain PyTorch functions in ``ops/`` (they define correctness; run anywhere).
- ``blocked``: plain PyTorch evaluated chunk by chunk (the CPU path): same results as the reference up to
  summation order, without the reference's large temporaries — ``hybrid_attention`` (``ops.blocked_attention``,
  recomputing backward: cost and memory of the sparse attention), ``compressed_attention_mass``,
  ``indexer_scores`` (``ops.blocked_indexer``), ``indexer_select`` (``ops.blocked_indexer_select``: streamed
  top-k) and ``indexer_attention_kl`` (``ops.indexer_kl``: the streamed KL loss), ``apply_rope``,
  ``linear_cross_entropy``, ``rms_norm``. Ops without one fall back to their reference.
- ``triton``: fused kernels (GPU, or CPU through ``TRITON_INTERPRET=1`` for tests).
- ``auto``: Triton when the inputs live on a CUDA device and a kernel is registered, else ``blocked`` when
  registered, else the reference.

Ops register themselves with ``register(name, reference=fn)`` / ``register(name, triton=fn)`` (every backend of an
op with the same parameter names and order). Callers — the model, the optimizer — use the typed functions of
``ops.functional`` (``from ops import functional as op``; ``op.hybrid_attention(q, kv, sinks=..., scale=..., ...)``),
one per op with its scalar and optional arguments keyword-only, each resolving its backend here per call
(``get(name, first_tensor)``) so the switch can change between steps. ``get`` / ``call`` stay for the functions of
``ops.functional`` and for tests that check which implementation is resolved.
The model config's ``model.ops_backend`` sets the switch through ``set_backend``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "blocked", "triton")
_registry: dict[str, dict[str, Callable[..., Any]]] = {}
_backend = os.environ.get("V4_OPS_BACKEND", "auto")


def register(
    name: str,
    *,
    reference: Callable[..., Any] | None = None,
    blocked: Callable[..., Any] | None = None,
    triton: Callable[..., Any] | None = None,
) -> None:
    entry = _registry.setdefault(name, {})
    for kind, fn in (("reference", reference), ("blocked", blocked), ("triton", triton)):
        if fn is not None:
            entry[kind] = fn


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"ops backend '{name}' unknown; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def _on_cuda(args: tuple[Any, ...]) -> bool:
    for a in args:
        if hasattr(a, "is_cuda"):
            return bool(a.is_cuda)
    return False


def _ensure_loaded() -> None:
    # importing the op modules registers them
    import ops  # noqa: F401


def get(name: str, *example_args: Any) -> Callable[..., Any]:
    _ensure_loaded()
    entry = _registry.get(name)
    if entry is None:
        raise KeyError(f"op '{name}' is not registered; known: {sorted(_registry)}")
    want = _backend
    if want == "auto":
        if "triton" in entry and _on_cuda(example_args):
            want = "triton"
        else:
            want = "blocked" if "blocked" in entry else "reference"
    elif want == "blocked" and "blocked" not in entry:
        want = "reference"
    if want not in entry:
        raise RuntimeError(
            f"op '{name}' has no '{want}' implementation (have {sorted(entry)}); "
            f"set model.ops_backend=reference or auto"
        )
    return entry[want]


def chunk_rows(budget: dict[str, int], per_row: int, device: Any) -> int:
    """Rows per chunk of a blocked op: a [rows, per_row] temporary holds at most ``budget["cuda"]`` elements
    on a CUDA ``device``, ``budget["cpu"]`` elsewhere (at least one row)."""
    return max(1, budget["cuda" if device.type == "cuda" else "cpu"] // max(1, per_row))


def call(name: str, *args: Any, **kwargs: Any) -> Any:
    return get(name, *args)(*args, **kwargs)


def registered() -> dict[str, list[str]]:
    _ensure_loaded()
    return {k: sorted(v) for k, v in sorted(_registry.items())}
