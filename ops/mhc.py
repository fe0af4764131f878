"""Manifold-Constrained Hyper-Connections (mHC): PyTorch reference ops (deepseek-v4.md §3.2, §3.3).

The residual state of one token is X ∈ R^{n×d} (n = ``hc_mult`` streams). Every sub-layer (attention, MoE)
is wrapped as

    (x_in, post, comb) = mhc_pre(X)          # collapse n streams into the sub-layer input
    o                  = F(RMSNorm(x_in))    # the sub-layer
    X_new              = mhc_post(o, X, post, comb)

and the last block's streams are collapsed once more by ``hc_head``. Shapes use T = flattened tokens.

Parameters of one mHC site (fp32): ``fn`` ∈ [(2+n)·n, n·d], ``base`` ∈ [(2+n)·n], ``scale`` ∈ [3]. Rows
0..n−1 of ``fn``/``base`` give "pre", rows n..2n−1 "post", rows 2n.. the n×n "comb" matrix (row-major).

Formulas (per token, x = vec(X) ∈ R^{n·d}):
    r       = 1 / sqrt(mean(x²) + rms_eps)                       (unweighted RMSNorm, no learnable weight)
    mix     = (x · fnᵀ) · r                                      ∈ R^{(2+n)n}
    pre_j   = σ(α_pre · mix_j + b_j) + hc_eps
    post_j  = 2 σ(α_post · mix_{n+j} + b_{n+j})
    comb    = Sinkhorn(α_res · Mat(mix_{2n:}) + Mat(b_{2n:}))    doubly stochastic (columns exact)
    x_in    = Σ_j pre_j X_j
    X_new_k = post_k · o + Σ_j comb_{jk} X_j                     (comb applied TRANSPOSED: B_l = combᵀ)

All math runs in fp32 (or fp64 when the inputs are fp64, for gradcheck); ``x_in`` and ``X_new`` are returned
in the dtype of ``x``. The Triton kernels in ``ops/triton`` implement the same signatures.
"""
from __future__ import annotations

import torch

from ops.dispatch import register


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 if any input is fp64 (keeps gradcheck exact)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project ``logits`` [T, n, n] onto (nearly) doubly-stochastic matrices, §3.2 step 5.

    M = softmax_k(L) + eps                      (row softmax)
    M ← M / (Σ_j M_jk + eps)                    (column normalise)
    repeat iters − 1 times:  M ← M / (Σ_k M_jk + eps)  (rows),  M ← M / (Σ_j M_jk + eps)  (columns)

    The last step is a column normalisation, so columns sum to 1 up to eps; rows approximately.
    """
    _check(logits.dim() == 3 and logits.shape[-1] == logits.shape[-2],
           f"sinkhorn: logits must be [T, n, n], got {tuple(logits.shape)}")
    _check(iters >= 1, f"sinkhorn: iters must be >= 1, got {iters}")
    m = torch.softmax(logits.to(_compute_dtype(logits)), dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def _rms_mix(x: torch.Tensor, fn: torch.Tensor, rms_eps: float, dtype: torch.dtype) -> torch.Tensor:
    """mix = (vec(X) · fnᵀ) · r with r = 1/sqrt(mean(vec(X)²) + rms_eps); x [T, n, d] -> [T, rows]."""
    flat = x.reshape(x.shape[0], -1).to(dtype)
    r = torch.rsqrt(flat.square().mean(dim=-1, keepdim=True) + rms_eps)
    return (flat @ fn.to(dtype).t()) * r


def mhc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, rms_eps: float,
            hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC "pre" side (§3.2 steps 1-6): x [T, n, d] -> (x_in [T, d] in x.dtype, post [T, n], comb [T, n, n])."""
    _check(x.dim() == 3, f"mhc_pre: x must be [T, n, d], got {tuple(x.shape)}")
    t, n, d = x.shape
    rows = (2 + n) * n
    _check(tuple(fn.shape) == (rows, n * d),
           f"mhc_pre: fn must be [(2+n)*n, n*d] = [{rows}, {n * d}] for x {tuple(x.shape)}, got {tuple(fn.shape)}")
    _check(tuple(base.shape) == (rows,), f"mhc_pre: base must be [{rows}], got {tuple(base.shape)}")
    _check(tuple(scale.shape) == (3,), f"mhc_pre: scale must be [3] (pre, post, comb), got {tuple(scale.shape)}")
    dtype = _compute_dtype(x, fn, base, scale)
    mix = _rms_mix(x, fn, rms_eps, dtype)
    base = base.to(dtype)
    scale = scale.to(dtype)
    pre = torch.sigmoid(mix[:, :n] * scale[0] + base[:n]) + hc_eps
    post = 2.0 * torch.sigmoid(mix[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb_logits = (mix[:, 2 * n:] * scale[2] + base[2 * n:]).view(t, n, n)
    comb = sinkhorn(comb_logits, iters, hc_eps)
    x_in = (pre.unsqueeze(-1) * x.to(dtype)).sum(dim=1).to(x.dtype)
    return x_in, post, comb


def mhc_post(o: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC "post" side (§3.2 step 7): X_new[k] = post_k · o + Σ_j comb_{jk} X[j]; returns [T, n, d] in x.dtype."""
    _check(x.dim() == 3, f"mhc_post: x must be [T, n, d], got {tuple(x.shape)}")
    t, n, d = x.shape
    _check(tuple(o.shape) == (t, d), f"mhc_post: o must be [T, d] = [{t}, {d}], got {tuple(o.shape)}")
    _check(tuple(post.shape) == (t, n), f"mhc_post: post must be [{t}, {n}], got {tuple(post.shape)}")
    _check(tuple(comb.shape) == (t, n, n), f"mhc_post: comb must be [{t}, {n}, {n}], got {tuple(comb.shape)}")
    dtype = _compute_dtype(o, x, post, comb)
    mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), x.to(dtype))
    return (post.to(dtype).unsqueeze(-1) * o.to(dtype).unsqueeze(1) + mixed).to(x.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, rms_eps: float,
            hc_eps: float) -> torch.Tensor:
    """Final stream collapse (§3.3): a_j = σ(α · mix_j + b_j) + hc_eps, y = Σ_j a_j X[j]; x [T, n, d] -> [T, d]."""
    _check(x.dim() == 3, f"hc_head: x must be [T, n, d], got {tuple(x.shape)}")
    _, n, d = x.shape
    _check(tuple(fn.shape) == (n, n * d), f"hc_head: fn must be [n, n*d] = [{n}, {n * d}], got {tuple(fn.shape)}")
    _check(tuple(base.shape) == (n,), f"hc_head: base must be [{n}], got {tuple(base.shape)}")
    _check(tuple(scale.shape) == (1,), f"hc_head: scale must be [1], got {tuple(scale.shape)}")
    dtype = _compute_dtype(x, fn, base, scale)
    mix = _rms_mix(x, fn, rms_eps, dtype)
    a = torch.sigmoid(mix * scale.to(dtype) + base.to(dtype)) + hc_eps
    return (a.unsqueeze(-1) * x.to(dtype)).sum(dim=1).to(x.dtype)


register("sinkhorn", reference=sinkhorn)
register("mhc_pre", reference=mhc_pre)
register("mhc_post", reference=mhc_post)
register("hc_head", reference=hc_head)
