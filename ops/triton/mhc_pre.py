"""mHC pre side as fused Triton kernels (reference: ``ops/mhc.py``; spec docs/MODEL.md §3.2/§3.3).

Per token, with x = vec(X) ∈ R^{K}, K = n·d, R = (2+n)·n rows of ``fn`` (R = n for ``hc_head``):

    y     = x · fnᵀ ∈ R^R                      (raw projection, fp32 accumulation)
    r     = (Σ x² / K + rms_eps)^{-1/2}
    mix   = y · r
    pre_j = σ(s₀ mix_j + b_j) + hc_eps                          x_in = Σ_j pre_j X_j
    post_j = 2σ(s₁ mix_{n+j} + b_{n+j})
    L_jk  = s₂ mix_{2n+jn+k} + b_{2n+jn+k},   comb = Sinkhorn(L)

Sinkhorn (``iters`` = t_max): M = softmax_k(L) + ε; M /= (col sums + ε); (iters−1)× {M /= (row sums + ε);
M /= (col sums + ε)}. Written as 2·iters steps: step 0 = softmax+ε, odd steps = column normalise, even
steps ≥ 2 = row normalise.

Forward kernel (one program per BT tokens): K-loop of a [BT, BK]·[BK, RP] dot with the sum of squares
alongside, then the gates and all Sinkhorn steps in registers, then a second pass over X for the collapse.
Only y, r (for backward), pre, post, comb and x_in are written.

Backward (recompute, nothing of Sinkhorn is stored):
* normalisation step y = m/(s+ε), s = Σ m over the axis:  ∂m = (∂y − Σ(∂y ⊙ y)) / (s+ε)  (same axis);
* softmax step p = softmax(L) (+ε):  ∂L = p ⊙ (∂M − Σ_k ∂M p);
  the input of step i is recomputed from L by running steps 0..i−1 (O(iters²) tiny n×n steps, no storage);
* σ gates: ∂z = ∂pre σ(1−σ), ∂z = ∂post · 2σ(1−σ);  ∂mix = s ⊙ ∂z;  ∂s = Σ ∂z ⊙ mix;  ∂b = Σ_t ∂z;
* ∂pre_j = ⟨∂x_in, X_j⟩;  ∂y = ∂mix · r;  ∂r = ⟨∂mix, y⟩;  ∂x = ∂y·fn − (∂r r³ / K) x + pre_j ∂x_in;
* ∂fn = ∂yᵀ x (a [R, T]·[T, K] product, one program per K-slice, deterministic over T).
∂base and ∂scale are per-program partial sums reduced in a fixed order (deterministic).

Layout assumptions: n must be a power of two (n = 4 in V4); other n fall back to the reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ops import mhc as _ref
from ops.triton import native, new_empty


# fp32 dots: 3-pass tf32 on the GPU keeps ~fp32 accuracy at tensor-core speed; the interpreter is exact.
def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_DOT_PREC = "ieee" if _interp() else "tf32x3"
_BT = 16


@triton.jit
def _sk_col(M, eps):
    """Column normalisation (odd steps): M / (Σ_j M[:, j, k] + ε)."""
    return M / (tl.sum(M, axis=1)[:, None, :] + eps)


@triton.jit
def _sk_row(M, eps):
    """Row normalisation (even steps ≥ 2): M / (Σ_k M[:, j, k] + ε)."""
    return M / (tl.sum(M, axis=2)[:, :, None] + eps)


@triton.jit
def _sk_col_state(L, k, eps):
    """Output of step 2k−1 (k ≥ 1) on logits L [BT, N, N]: softmax+ε, column, then k−1 × (row, column).
    k = iters gives the Sinkhorn result. The parity of every step is static (no runtime branch): the
    compiler requires both branches of a runtime ``if`` to give identically shaped values."""
    mx = tl.max(L, axis=2)
    p = tl.exp(L - mx[:, :, None])
    M = _sk_col(p / tl.sum(p, axis=2)[:, :, None] + eps, eps)
    for _ in range(1, k):
        M = _sk_col(_sk_row(M, eps), eps)
    return M


@triton.jit
def _sk_backward(L, G, iters, eps):
    """∂L of comb = Sinkhorn(L) given ∂comb = G; inputs of each step recomputed from L (O(iters²) tiny steps).

    Normalisation y = m/(s+ε) over one axis:  ∂m = (∂y − Σ(∂y ⊙ y)) / (s+ε)  (same axis). Steps are walked
    backwards in (column 2k+1, row 2k) pairs for k = iters−1 … 1, then column step 1, then the softmax."""
    for i in range(0, iters - 1):
        k = iters - 1 - i
        A = _sk_col_state(L, k, eps)  # output of step 2k−1 = input of row step 2k
        den_r = tl.sum(A, axis=2)[:, :, None] + eps
        B = A / den_r  # output of step 2k = input of column step 2k+1
        den_c = tl.sum(B, axis=1)[:, None, :] + eps
        Yc = B / den_c
        G = (G - tl.sum(G * Yc, axis=1)[:, None, :]) / den_c
        G = (G - tl.sum(G * B, axis=2)[:, :, None]) / den_r
    mx = tl.max(L, axis=2)
    p = tl.exp(L - mx[:, :, None])
    p = p / tl.sum(p, axis=2)[:, :, None]
    M0 = p + eps  # output of step 0 = input of column step 1
    den1 = tl.sum(M0, axis=1)[:, None, :] + eps
    G = (G - tl.sum(G * (M0 / den1), axis=1)[:, None, :]) / den1
    return p * (G - tl.sum(G * p, axis=2)[:, :, None])


@triton.jit
def _gather_cols(acc, base_col, N: tl.constexpr, RP: tl.constexpr):
    """acc [BT, RP] -> acc[:, base_col + j] as [BT, N] (one-hot contraction, no dynamic register indexing)."""
    cols = tl.arange(0, RP)
    j = tl.arange(0, N)
    sel = (cols[None, :] == (base_col + j)[:, None]).to(tl.float32)  # [N, RP]
    return tl.sum(acc[:, None, :] * sel[None, :, :], axis=2)


@triton.jit
def _gather_mat(acc, base_col, N: tl.constexpr, RP: tl.constexpr):
    """acc [BT, RP] -> acc[:, base_col + j·N + k] as [BT, N, N]."""
    cols = tl.arange(0, RP)
    jk = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]  # [N, N]
    sel = (cols[None, None, :] == (base_col + jk)[:, :, None]).to(tl.float32)  # [N, N, RP]
    return tl.sum(acc[:, None, None, :] * sel[None, :, :, :], axis=3)


@triton.jit
def _scatter_cols(v, base_col, N: tl.constexpr, RP: tl.constexpr):
    """[BT, N] -> [BT, RP] with v placed at columns base_col + j (zeros elsewhere)."""
    cols = tl.arange(0, RP)
    j = tl.arange(0, N)
    sel = (cols[None, :] == (base_col + j)[:, None]).to(tl.float32)
    return tl.sum(v[:, :, None] * sel[None, :, :], axis=1)


@triton.jit
def _scatter_mat(v, base_col, N: tl.constexpr, RP: tl.constexpr):
    cols = tl.arange(0, RP)
    jk = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
    sel = (cols[None, None, :] == (base_col + jk)[:, :, None]).to(tl.float32)
    return tl.sum(tl.sum(v[:, :, :, None] * sel[None, :, :, :], axis=2), axis=1)


@triton.jit
def _mhc_pre_fwd_kernel(
    x_ptr,
    fn_ptr,
    base_ptr,
    scale_ptr,
    y_ptr,
    r_ptr,
    pre_ptr,
    post_ptr,
    comb_ptr,
    xin_ptr,
    T,
    D,
    rms_eps,
    hc_eps,
    iters,
    N: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    HEAD: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    K = N * D
    offs_t = pid * BT + tl.arange(0, BT)
    tmask = offs_t < T
    offs_r = tl.arange(0, RP)
    acc = tl.zeros([BT, RP], dtype=tl.float32)
    ss = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < K
        xt = tl.load(
            x_ptr + offs_t[:, None].to(tl.int64) * K + offs_k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0
        ).to(tl.float32)
        ft = tl.load(
            fn_ptr + offs_r[None, :] * K + offs_k[:, None], mask=(offs_r[None, :] < R) & kmask[:, None], other=0.0
        ).to(tl.float32)
        acc += tl.dot(xt, ft, input_precision=PREC)
        ss += tl.sum(xt * xt, axis=1)
    r = 1.0 / tl.sqrt(ss / K + rms_eps)
    tl.store(y_ptr + offs_t[:, None] * RP + offs_r[None, :], acc, mask=tmask[:, None])
    tl.store(r_ptr + offs_t, r, mask=tmask)
    mix = acc * r[:, None]
    bvec = tl.load(base_ptr + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    s0 = tl.load(scale_ptr).to(tl.float32)
    offs_n = tl.arange(0, N)
    z0 = _gather_cols(mix, 0, N, RP) * s0 + _gather_cols(bvec[None, :], 0, N, RP)
    pre = tl.sigmoid(z0) + hc_eps
    tl.store(pre_ptr + offs_t[:, None] * N + offs_n[None, :], pre, mask=tmask[:, None])
    if not HEAD:
        s1 = tl.load(scale_ptr + 1).to(tl.float32)
        s2 = tl.load(scale_ptr + 2).to(tl.float32)
        z1 = _gather_cols(mix, N, N, RP) * s1 + _gather_cols(bvec[None, :], N, N, RP)
        post = 2.0 * tl.sigmoid(z1)
        tl.store(post_ptr + offs_t[:, None] * N + offs_n[None, :], post, mask=tmask[:, None])
        L = _gather_mat(mix, 2 * N, N, RP) * s2 + _gather_mat(bvec[None, :], 2 * N, N, RP)
        comb = _sk_col_state(L, iters, hc_eps)
        jk = offs_n[:, None] * N + offs_n[None, :]
        tl.store(comb_ptr + offs_t[:, None, None] * (N * N) + jk[None, :, :], comb, mask=tmask[:, None, None])
    # collapse: x_in = Σ_j pre_j X_j
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dmask = offs_d < D
        m3 = tmask[:, None, None] & dmask[None, None, :]
        x3 = tl.load(
            x_ptr + offs_t[:, None, None].to(tl.int64) * K + offs_n[None, :, None] * D + offs_d[None, None, :],
            mask=m3,
            other=0.0,
        ).to(tl.float32)
        xin = tl.sum(x3 * pre[:, :, None], axis=1)
        tl.store(
            xin_ptr + offs_t[:, None].to(tl.int64) * D + offs_d[None, :],
            xin.to(xin_ptr.dtype.element_ty),
            mask=tmask[:, None] & dmask[None, :],
        )


@triton.jit
def _mhc_pre_bwd_kernel(
    x_ptr,
    base_ptr,
    scale_ptr,
    y_ptr,
    r_ptr,
    gxin_ptr,
    gpost_ptr,
    gcomb_ptr,
    gy_ptr,
    coef_ptr,
    gbase_part_ptr,
    gscale_part_ptr,
    T,
    D,
    hc_eps,
    iters,
    N: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    HEAD: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    pid = tl.program_id(0)
    K = N * D
    offs_t = pid * BT + tl.arange(0, BT)
    tmask = offs_t < T
    offs_r = tl.arange(0, RP)
    offs_n = tl.arange(0, N)
    y = tl.load(y_ptr + offs_t[:, None] * RP + offs_r[None, :], mask=tmask[:, None], other=0.0)
    r = tl.load(r_ptr + offs_t, mask=tmask, other=0.0)
    mix = y * r[:, None]
    bvec = tl.load(base_ptr + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    s0 = tl.load(scale_ptr).to(tl.float32)
    # ∂pre_j = <∂x_in, X_j>
    gpre = tl.zeros([BT, N], dtype=tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dmask = offs_d < D
        x3 = tl.load(
            x_ptr + offs_t[:, None, None].to(tl.int64) * K + offs_n[None, :, None] * D + offs_d[None, None, :],
            mask=tmask[:, None, None] & dmask[None, None, :],
            other=0.0,
        ).to(tl.float32)
        gx = tl.load(
            gxin_ptr + offs_t[:, None].to(tl.int64) * D + offs_d[None, :],
            mask=tmask[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        gpre += tl.sum(x3 * gx[:, None, :], axis=2)
    mpre = _gather_cols(mix, 0, N, RP)
    sg0 = tl.sigmoid(mpre * s0 + _gather_cols(bvec[None, :], 0, N, RP))
    gz0 = gpre * sg0 * (1.0 - sg0)
    gmix = _scatter_cols(gz0 * s0, 0, N, RP)
    gbase = _scatter_cols(gz0, 0, N, RP)
    gs0 = tl.sum(tl.sum(gz0 * mpre, axis=1), axis=0)
    gs1 = gs0 * 0.0
    gs2 = gs0 * 0.0
    if not HEAD:
        s1 = tl.load(scale_ptr + 1).to(tl.float32)
        s2 = tl.load(scale_ptr + 2).to(tl.float32)
        mpost = _gather_cols(mix, N, N, RP)
        sg1 = tl.sigmoid(mpost * s1 + _gather_cols(bvec[None, :], N, N, RP))
        gpost = tl.load(gpost_ptr + offs_t[:, None] * N + offs_n[None, :], mask=tmask[:, None], other=0.0)
        gz1 = gpost * 2.0 * sg1 * (1.0 - sg1)
        gmix += _scatter_cols(gz1 * s1, N, N, RP)
        gbase += _scatter_cols(gz1, N, N, RP)
        gs1 = tl.sum(tl.sum(gz1 * mpost, axis=1), axis=0)
        mcomb = _gather_mat(mix, 2 * N, N, RP)
        L = mcomb * s2 + _gather_mat(bvec[None, :], 2 * N, N, RP)
        jk = offs_n[:, None] * N + offs_n[None, :]
        G = tl.load(gcomb_ptr + offs_t[:, None, None] * (N * N) + jk[None, :, :], mask=tmask[:, None, None], other=0.0)
        gL = _sk_backward(L, G, iters, hc_eps)
        gmix += _scatter_mat(gL * s2, 2 * N, N, RP)
        gbase += _scatter_mat(gL, 2 * N, N, RP)
        gs2 = tl.sum(tl.sum(tl.sum(gL * mcomb, axis=2), axis=1), axis=0)
    # mix = y·r:  ∂y = ∂mix·r, ∂r = <∂mix, y>, ∂x += -(∂r r³/K) x
    gy = gmix * r[:, None]
    gr = tl.sum(gmix * y, axis=1)
    coef = -gr * r * r * r / K
    tl.store(gy_ptr + offs_t[:, None] * RP + offs_r[None, :], gy, mask=tmask[:, None])
    tl.store(coef_ptr + offs_t, coef, mask=tmask)
    tl.store(gbase_part_ptr + pid * RP + offs_r, tl.sum(gbase, axis=0))
    offs_3 = tl.arange(0, 4)
    gsv = tl.where(offs_3 == 0, gs0, tl.where(offs_3 == 1, gs1, tl.where(offs_3 == 2, gs2, 0.0)))
    tl.store(gscale_part_ptr + pid * 4 + offs_3, gsv)


@triton.jit
def _mhc_pre_dx_kernel(
    x_ptr,
    fn_ptr,
    gy_ptr,
    coef_ptr,
    pre_ptr,
    gxin_ptr,
    gx_ptr,
    T,
    D,
    N: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """∂x[t, k] = Σ_c ∂y[t,c] fn[c,k] + coef_t x[t,k] + pre[t, k//D] ∂x_in[t, k%D]."""
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    K = N * D
    offs_t = pid_t * BT + tl.arange(0, BT)
    tmask = offs_t < T
    offs_k = pid_k * BK + tl.arange(0, BK)
    kmask = offs_k < K
    offs_r = tl.arange(0, RP)
    m2 = tmask[:, None] & kmask[None, :]
    gy = tl.load(gy_ptr + offs_t[:, None] * RP + offs_r[None, :], mask=tmask[:, None], other=0.0)
    fnt = tl.load(
        fn_ptr + offs_r[:, None] * K + offs_k[None, :], mask=(offs_r[:, None] < R) & kmask[None, :], other=0.0
    ).to(tl.float32)
    acc = tl.dot(gy, fnt, input_precision=PREC)
    xt = tl.load(x_ptr + offs_t[:, None].to(tl.int64) * K + offs_k[None, :], mask=m2, other=0.0).to(tl.float32)
    coef = tl.load(coef_ptr + offs_t, mask=tmask, other=0.0)
    pre = tl.load(pre_ptr + offs_t[:, None] * N + (offs_k // D)[None, :], mask=m2, other=0.0)
    gxin = tl.load(gxin_ptr + offs_t[:, None].to(tl.int64) * D + (offs_k % D)[None, :], mask=m2, other=0.0).to(
        tl.float32
    )
    acc += coef[:, None] * xt + pre * gxin
    tl.store(gx_ptr + offs_t[:, None].to(tl.int64) * K + offs_k[None, :], acc.to(gx_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _mhc_pre_dfn_kernel(
    x_ptr,
    gy_ptr,
    gfn_ptr,
    T,
    K,
    R: tl.constexpr,
    RP: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """∂fn[c, k] = Σ_t ∂y[t, c] x[t, k]; one program per K-slice, fixed-order loop over T."""
    pid = tl.program_id(0)
    offs_k = pid * BK + tl.arange(0, BK)
    kmask = offs_k < K
    offs_r = tl.arange(0, RP)
    acc = tl.zeros([RP, BK], dtype=tl.float32)
    for t0 in range(0, T, BT):
        offs_t = t0 + tl.arange(0, BT)
        tmask = offs_t < T
        gyt = tl.load(gy_ptr + offs_t[None, :] * RP + offs_r[:, None], mask=tmask[None, :], other=0.0)
        xt = tl.load(
            x_ptr + offs_t[:, None].to(tl.int64) * K + offs_k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.dot(gyt, xt, input_precision=PREC)
    tl.store(
        gfn_ptr + offs_r[:, None] * K + offs_k[None, :],
        acc.to(gfn_ptr.dtype.element_ty),
        mask=(offs_r[:, None] < R) & kmask[None, :],
    )


@triton.jit
def _sinkhorn_fwd_kernel(l_ptr, out_ptr, T, iters, eps, N: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    offs_t = pid * BT + tl.arange(0, BT)
    offs_n = tl.arange(0, N)
    jk = offs_n[:, None] * N + offs_n[None, :]
    m3 = (offs_t < T)[:, None, None]
    L = tl.load(l_ptr + offs_t[:, None, None] * (N * N) + jk[None, :, :], mask=m3, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_t[:, None, None] * (N * N) + jk[None, :, :], _sk_col_state(L, iters, eps), mask=m3)


@triton.jit
def _sinkhorn_bwd_kernel(l_ptr, g_ptr, gl_ptr, T, iters, eps, N: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    offs_t = pid * BT + tl.arange(0, BT)
    offs_n = tl.arange(0, N)
    jk = offs_n[:, None] * N + offs_n[None, :]
    m3 = (offs_t < T)[:, None, None]
    L = tl.load(l_ptr + offs_t[:, None, None] * (N * N) + jk[None, :, :], mask=m3, other=0.0).to(tl.float32)
    G = tl.load(g_ptr + offs_t[:, None, None] * (N * N) + jk[None, :, :], mask=m3, other=0.0).to(tl.float32)
    gL = _sk_backward(L, G, iters, eps)
    tl.store(gl_ptr + offs_t[:, None, None] * (N * N) + jk[None, :, :], gL.to(gl_ptr.dtype.element_ty), mask=m3)


def _pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _rp(rows: int) -> int:
    return max(16, triton.next_power_of_2(rows))


def _blocks(d: int) -> tuple[int, int]:
    bd = min(128, triton.next_power_of_2(d))
    return bd, 64


def _run_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    rms_eps: float,
    hc_eps: float,
    iters: int,
    head: bool,
):
    T, n, d = x.shape
    R = fn.shape[0]
    RP = _rp(R)
    dev = x.device
    y = new_empty((T, RP), device=dev, dtype=torch.float32)
    r = new_empty((T), device=dev, dtype=torch.float32)
    pre = new_empty((T, n), device=dev, dtype=torch.float32)
    post = new_empty((T, n), device=dev, dtype=torch.float32)
    comb = new_empty((T, n, n), device=dev, dtype=torch.float32)
    x_in = new_empty((T, d), device=dev, dtype=x.dtype)
    bd, bk = _blocks(d)
    grid = (triton.cdiv(T, _BT),)
    _mhc_pre_fwd_kernel[grid](
        x,
        fn,
        base,
        scale,
        y,
        r,
        pre,
        post,
        comb,
        x_in,
        T,
        d,
        float(rms_eps),
        float(hc_eps),
        int(iters),
        N=n,
        R=R,
        RP=RP,
        HEAD=head,
        BT=_BT,
        BK=bk,
        BD=bd,
        PREC=_DOT_PREC,
    )
    return x_in, post, comb, y, r, pre


def _run_pre_bwd(x, fn, base, scale, y, r, pre, g_xin, g_post, g_comb, hc_eps, iters, head):
    T, n, d = x.shape
    R = fn.shape[0]
    RP = y.shape[1]
    K = n * d
    dev = x.device
    nprog = triton.cdiv(T, _BT)
    gy = new_empty((T, RP), device=dev, dtype=torch.float32)
    coef = new_empty((T), device=dev, dtype=torch.float32)
    gbase_part = new_empty((nprog, RP), device=dev, dtype=torch.float32)
    gscale_part = new_empty((nprog, 4), device=dev, dtype=torch.float32)
    bd, bk = _blocks(d)
    _mhc_pre_bwd_kernel[(nprog,)](
        x,
        base,
        scale,
        y,
        r,
        g_xin,
        g_post,
        g_comb,
        gy,
        coef,
        gbase_part,
        gscale_part,
        T,
        d,
        float(hc_eps),
        int(iters),
        N=n,
        R=R,
        RP=RP,
        HEAD=head,
        BT=_BT,
        BD=bd,
    )
    gx = new_empty(x.shape, device=x.device, dtype=x.dtype)
    _mhc_pre_dx_kernel[(nprog, triton.cdiv(K, bk))](
        x, fn, gy, coef, pre, g_xin, gx, T, d, N=n, R=R, RP=RP, BT=_BT, BK=bk, PREC=_DOT_PREC
    )
    gfn = new_empty((R, K), device=dev, dtype=fn.dtype)
    bkf = 128 if not _interp() else 64
    _mhc_pre_dfn_kernel[(triton.cdiv(K, bkf),)](
        x, gy, gfn, T, K, R=R, RP=RP, BT=64 if not _interp() else 16, BK=bkf, PREC=_DOT_PREC
    )
    gbase = gbase_part.sum(0)[:R].to(base.dtype)
    gscale = gscale_part.sum(0)[: scale.shape[0]].to(scale.dtype)
    return gx, gfn, gbase, gscale


class _MhcPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, base, scale, rms_eps, hc_eps, iters, head):
        x, fn, base, scale = (t.contiguous() for t in (x, fn, base, scale))
        x_in, post, comb, y, r, pre = _run_pre(x, fn, base, scale, rms_eps, hc_eps, iters, head)
        ctx.save_for_backward(x, fn, base, scale, y, r, pre)
        ctx.cfg = (hc_eps, iters, head)
        if head:
            return x_in
        return x_in, post, comb

    @staticmethod
    def backward(ctx, *grads):
        x, fn, base, scale, y, r, pre = ctx.saved_tensors
        hc_eps, iters, head = ctx.cfg
        T, n, d = x.shape
        g_xin = grads[0]
        g_xin = torch.zeros(T, d, device=x.device, dtype=x.dtype) if g_xin is None else g_xin.contiguous()
        if head:
            g_post = g_comb = g_xin  # unused by the kernel (HEAD)
        else:
            g_post = grads[1]
            g_comb = grads[2]
            g_post = (torch.zeros(T, n, device=x.device) if g_post is None else g_post).float().contiguous()
            g_comb = (torch.zeros(T, n, n, device=x.device) if g_comb is None else g_comb).float().contiguous()
        gx, gfn, gbase, gscale = _run_pre_bwd(x, fn, base, scale, y, r, pre, g_xin, g_post, g_comb, hc_eps, iters, head)
        return gx, gfn, gbase, gscale, None, None, None, None


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, iters, eps):
        L = logits.contiguous()
        T, n, _ = L.shape
        out = new_empty((T, n, n), device=L.device, dtype=torch.float32)
        _sinkhorn_fwd_kernel[(triton.cdiv(T, _BT),)](L, out, T, int(iters), float(eps), N=n, BT=_BT)
        ctx.save_for_backward(L)
        ctx.cfg = (iters, eps)
        return out

    @staticmethod
    def backward(ctx, g):
        (L,) = ctx.saved_tensors
        iters, eps = ctx.cfg
        T, n, _ = L.shape
        gl = new_empty(L.shape, device=L.device, dtype=L.dtype)
        _sinkhorn_bwd_kernel[(triton.cdiv(T, _BT),)](
            L, g.contiguous().float(), gl, T, int(iters), float(eps), N=n, BT=_BT
        )
        return gl, None, None


def _fallback(*tensors: torch.Tensor, n: int) -> bool:
    return (not _pow2(n)) or any(t.dtype == torch.float64 for t in tensors) or not native(tensors[0])


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Triton Sinkhorn (same contract as ``ops.mhc.sinkhorn``): logits [T, n, n] -> comb [T, n, n] fp32."""
    if logits.dim() != 3 or logits.shape[-1] != logits.shape[-2] or iters < 1 or _fallback(logits, n=logits.shape[-1]):
        return _ref.sinkhorn(logits, iters, eps)
    return _Sinkhorn.apply(logits, int(iters), float(eps))


def mhc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    rms_eps: float,
    hc_eps: float,
    iters: int,
):
    """Triton mHC pre side (same contract as ``ops.mhc.mhc_pre``): (x_in [T,d] x.dtype, post [T,n], comb [T,n,n])."""
    if (
        x.dim() != 3
        or _fallback(x, fn, base, scale, n=x.shape[1])
        or iters < 1
        or tuple(fn.shape) != ((2 + x.shape[1]) * x.shape[1], x.shape[1] * x.shape[2])
        or tuple(scale.shape) != (3,)
    ):
        return _ref.mhc_pre(x, fn, base, scale, rms_eps, hc_eps, iters)
    return _MhcPre.apply(x, fn, base, scale, float(rms_eps), float(hc_eps), int(iters), False)


def hc_head(
    x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, rms_eps: float, hc_eps: float
) -> torch.Tensor:
    """Triton final stream collapse (same contract as ``ops.mhc.hc_head``): x [T, n, d] -> [T, d]."""
    if (
        x.dim() != 3
        or _fallback(x, fn, base, scale, n=x.shape[1])
        or tuple(fn.shape) != (x.shape[1], x.shape[1] * x.shape[2])
        or tuple(scale.shape) != (1,)
    ):
        return _ref.hc_head(x, fn, base, scale, rms_eps, hc_eps)
    return _MhcPre.apply(x, fn, base, scale, float(rms_eps), float(hc_eps), 1, True)
