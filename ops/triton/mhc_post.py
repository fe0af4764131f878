"""mHC post side as Triton kernels (reference: ``ops.mhc.mhc_post``; spec docs/MODEL.md §3.2 step 7).

    X_new[t, k, :] = post[t, k] · o[t, :] + Σ_j comb[t, j, k] · X[t, j, :]      (comb applied transposed)

Backward (per token, G = ∂X_new):
    ∂o[t]          = Σ_k post[t,k] G[t,k]
    ∂X[t, j]       = Σ_k comb[t,j,k] G[t,k]
    ∂post[t, k]    = <G[t,k], o[t]>
    ∂comb[t, j, k] = <X[t,j], G[t,k]>
All math in fp32; ∂o/∂X in the dtypes of o/X, ∂post/∂comb in the dtypes of post/comb.
Forward: one program per (BT tokens, BD channels); backward: one program per BT tokens looping over d
(the <·,·> reductions over d stay in registers: deterministic, no atomics). n must be a power of two.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ops import mhc as _ref
from ops.triton import native, new_empty

_BT = 16


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mhc_post_fwd_kernel(
    o_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, T, D, N: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    offs_d = pid_d * BD + tl.arange(0, BD)
    dmask = offs_d < D
    offs_n = tl.arange(0, N)
    t64 = offs_t.to(tl.int64)
    m2 = tmask[:, None] & dmask[None, :]
    o = tl.load(o_ptr + t64[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + offs_t[:, None] * N + offs_n[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    acc = post[:, :, None] * o[:, None, :]  # [BT, N(k), BD]
    for j in tl.static_range(N):
        xj = tl.load(x_ptr + t64[:, None] * (N * D) + j * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        cj = tl.load(comb_ptr + offs_t[:, None] * (N * N) + j * N + offs_n[None, :], mask=tmask[:, None], other=0.0).to(
            tl.float32
        )  # comb[t, j, :]
        acc += cj[:, :, None] * xj[:, None, :]
    m3 = tmask[:, None, None] & dmask[None, None, :]
    tl.store(
        out_ptr + t64[:, None, None] * (N * D) + offs_n[None, :, None] * D + offs_d[None, None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m3,
    )


@triton.jit
def _mhc_post_bwd_kernel(
    g_ptr,
    o_ptr,
    x_ptr,
    post_ptr,
    comb_ptr,
    go_ptr,
    gx_ptr,
    gpost_ptr,
    gcomb_ptr,
    T,
    D,
    N: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    pid_t = tl.program_id(0)
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    offs_n = tl.arange(0, N)
    t64 = offs_t.to(tl.int64)
    post = tl.load(post_ptr + offs_t[:, None] * N + offs_n[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    gpost = tl.zeros([BT, N], dtype=tl.float32)
    gcomb = tl.zeros([BT, N, N], dtype=tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dmask = offs_d < D
        m2 = tmask[:, None] & dmask[None, :]
        m3 = tmask[:, None, None] & dmask[None, None, :]
        G = tl.load(
            g_ptr + t64[:, None, None] * (N * D) + offs_n[None, :, None] * D + offs_d[None, None, :], mask=m3, other=0.0
        ).to(tl.float32)  # [BT, N(k), BD]
        o = tl.load(o_ptr + t64[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        go = tl.sum(post[:, :, None] * G, axis=1)
        tl.store(go_ptr + t64[:, None] * D + offs_d[None, :], go.to(go_ptr.dtype.element_ty), mask=m2)
        gpost += tl.sum(G * o[:, None, :], axis=2)
        for j in tl.static_range(N):
            xj = tl.load(x_ptr + t64[:, None] * (N * D) + j * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
            cj = tl.load(
                comb_ptr + offs_t[:, None] * (N * N) + j * N + offs_n[None, :], mask=tmask[:, None], other=0.0
            ).to(tl.float32)
            gxj = tl.sum(cj[:, :, None] * G, axis=1)
            tl.store(
                gx_ptr + t64[:, None] * (N * D) + j * D + offs_d[None, :], gxj.to(gx_ptr.dtype.element_ty), mask=m2
            )
            row = tl.sum(xj[:, None, :] * G, axis=2)  # [BT, N(k)] = <X_j, G_k>
            gcomb += tl.where((offs_n == j)[None, :, None], row[:, None, :], 0.0)
    tl.store(
        gpost_ptr + offs_t[:, None] * N + offs_n[None, :], gpost.to(gpost_ptr.dtype.element_ty), mask=tmask[:, None]
    )
    jk = offs_n[:, None] * N + offs_n[None, :]
    tl.store(
        gcomb_ptr + offs_t[:, None, None] * (N * N) + jk[None, :, :],
        gcomb.to(gcomb_ptr.dtype.element_ty),
        mask=tmask[:, None, None],
    )


def _bd(d: int) -> int:
    return min(128 if not _interp() else 64, triton.next_power_of_2(d))


class _MhcPost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, x, post, comb):
        o, x, post, comb = (t.contiguous() for t in (o, x, post, comb))
        T, n, d = x.shape
        out = new_empty((T, n, d), device=x.device, dtype=x.dtype)
        bd = _bd(d)
        _mhc_post_fwd_kernel[(triton.cdiv(T, _BT), triton.cdiv(d, bd))](o, x, post, comb, out, T, d, N=n, BT=_BT, BD=bd)
        ctx.save_for_backward(o, x, post, comb)
        return out

    @staticmethod
    def backward(ctx, g):
        o, x, post, comb = ctx.saved_tensors
        T, n, d = x.shape
        g = g.contiguous()
        go = new_empty(o.shape, device=o.device, dtype=o.dtype)
        gx = new_empty(x.shape, device=x.device, dtype=x.dtype)
        gpost = new_empty(post.shape, device=post.device, dtype=post.dtype)
        gcomb = new_empty(comb.shape, device=comb.device, dtype=comb.dtype)
        _mhc_post_bwd_kernel[(triton.cdiv(T, _BT),)](
            g, o, x, post, comb, go, gx, gpost, gcomb, T, d, N=n, BT=_BT, BD=_bd(d)
        )
        return go, gx, gpost, gcomb


def mhc_post(o: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Triton mHC post side (same contract as ``ops.mhc.mhc_post``): returns [T, n, d] in x.dtype."""
    ok = (
        x.dim() == 3
        and (x.shape[1] & (x.shape[1] - 1)) == 0
        and tuple(o.shape) == (x.shape[0], x.shape[2])
        and tuple(post.shape) == tuple(x.shape[:2])
        and tuple(comb.shape) == (x.shape[0], x.shape[1], x.shape[1])
        and not any(t.dtype == torch.float64 for t in (o, x, post, comb))
        and native(x)
    )
    if not ok:
        return _ref.mhc_post(o, x, post, comb)
    return _MhcPost.apply(o, x, post, comb)
