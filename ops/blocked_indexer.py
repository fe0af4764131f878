"""Lightning-indexer scores in plain PyTorch, query chunk by query chunk, with a recomputing backward (CPU path).

Same contract and math as the reference ``ops.indexer.indexer_scores`` (read its docstring): with
``w'_{t,h} = w_{t,h} · H^{-1/2}`` and ``a = c^{-1/2}``,

    d_{t,h,s} = q_{t,h} · k_s,      I_{t,s} = a Σ_h w'_{t,h} ReLU(d_{t,h,s})

The reference materialises d, ReLU(d) and their products as [B, S, H, N] tensors (a GiB per layer at S = 16K,
N = 4K) and autograd saves them for the backward (the KL loss of §12.4 trains the indexer through them).
Here only (q, k, w) are saved; the forward and backward walk over query chunks whose [C, H, N] temporaries
fit ``CHUNK_ELEMENTS``, and the backward recomputes d per chunk:

    g_{t,h,s} = a · w'_{t,h} · 1[d_{t,h,s} > 0] · ∂I_{t,s}
    ∂q_{t,h} = Σ_s g_{t,h,s} k_s,     ∂k_s = Σ_{t,h} g_{t,h,s} q_{t,h},     ∂w_{t,h} = a H^{-1/2} Σ_s ReLU(d) ∂I_{t,s}

Registered in ``ops.dispatch`` as the ``blocked`` backend of ``indexer_scores``. Correctness:
``tests/test_ops_blocked_misc.py`` (against the reference, float64 gradcheck).
"""

from __future__ import annotations

import torch

from ops.blocked_attention import rows_t_rows
from ops.dispatch import chunk_rows, register
from ops.indexer import check_indexer_inputs

__all__ = ["blocked_indexer_scores", "CHUNK_ELEMENTS"]

# elements of the largest per-chunk temporary [B, C, H, N]; CPU 16 MiB in fp32: small enough to stay out of the
# allocator's mmap path (a fresh mapping per chunk costs page faults), large enough for efficient products
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 28}


def _chunks(B: int, S: int, H: int, N: int, device: torch.device):
    rows = chunk_rows(CHUNK_ELEMENTS, B * H * N, device)
    for t0 in range(0, S, rows):
        yield t0, min(S, t0 + rows)


class _BlockedIndexerScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, keys, weights):
        B, S, H, c = q.shape
        N = keys.shape[1]
        cdt = torch.promote_types(q.dtype, torch.float32)
        k = keys.to(cdt)
        w = weights.to(cdt) * H**-0.5
        out = torch.empty(B, S, N, dtype=cdt, device=q.device)
        for t0, t1 in _chunks(B, S, H, N, q.device):
            d = torch.einsum("bthc,bnc->bthn", q[:, t0:t1].to(cdt), k).relu_()
            out[:, t0:t1] = torch.einsum("bthn,bth->btn", d, w[:, t0:t1]) * c**-0.5
        ctx.save_for_backward(q, keys, weights)
        return out

    @staticmethod
    def backward(ctx, g_out):
        q, keys, weights = ctx.saved_tensors
        B, S, H, c = q.shape
        N = keys.shape[1]
        cdt = torch.promote_types(q.dtype, torch.float32)
        k = keys.to(cdt)
        a = c**-0.5
        w = weights.to(cdt) * H**-0.5
        g_out = g_out.to(cdt)
        dq = torch.empty(B, S, H, c, dtype=cdt, device=q.device)
        dk = torch.zeros(B, N, c, dtype=cdt, device=q.device)
        dw = torch.empty(B, S, H, dtype=cdt, device=q.device)
        for t0, t1 in _chunks(B, S, H, N, q.device):
            q_c, g_c = q[:, t0:t1].to(cdt), g_out[:, t0:t1]
            d = torch.einsum("bthc,bnc->bthn", q_c, k).relu_()
            dw[:, t0:t1] = torch.einsum("bthn,btn->bth", d, g_c) * (a * H**-0.5)
            # g = a w' 1[d > 0] ∂I, built in d's storage (ReLU(d) > 0 iff d > 0)
            gd = d.gt_(0).mul_(g_c[:, :, None, :]).mul_((w[:, t0:t1] * a)[..., None])
            dq[:, t0:t1] = torch.einsum("bthn,bnc->bthc", gd, k)
            dk += rows_t_rows(gd, q_c)
        return dq.to(q.dtype), dk.to(keys.dtype), dw.to(weights.dtype)


def blocked_indexer_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``ops.indexer.indexer_scores`` (same arguments, shapes, dtype and results up to
    floating-point summation order); see the module docstring for how it is evaluated."""
    check_indexer_inputs(q, keys, weights)
    return _BlockedIndexerScores.apply(q, keys, weights)


register("indexer_scores", blocked=blocked_indexer_scores)
