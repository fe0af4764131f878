"""Manifold-Constrained Hyper-Connections (mHC): PyTorch reference ops (docs/MODEL.md §3.2, §3.3).

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

``sinkhorn`` runs as one autograd node with a hand-written backward (CPU eager speed: autograd would record
~120 forward and ~300 backward ops per mHC site); ``sinkhorn_autograd`` is its plain definition.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ops.dispatch import register


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 if any input is fp64 (keeps gradcheck exact)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_sinkhorn_args(logits: torch.Tensor, iters: int) -> None:
    _check(
        logits.dim() == 3 and logits.shape[-1] == logits.shape[-2],
        f"sinkhorn: logits must be [T, n, n], got {tuple(logits.shape)}",
    )
    _check(iters >= 1, f"sinkhorn: iters must be >= 1, got {iters}")


def sinkhorn_autograd(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Plain-autograd Sinkhorn: the definition of :func:`sinkhorn` (same formulas, one autograd node per op).

    M = softmax_k(L) + eps                      (row softmax)
    M ← M / (Σ_j M_jk + eps)                    (column normalise)
    repeat iters − 1 times:  M ← M / (Σ_k M_jk + eps)  (rows),  M ← M / (Σ_j M_jk + eps)  (columns)

    Autograd records 3 ops per normalisation (sum, +eps, divide) and ~8 backward ops for it, for each of the
    2·iters − 1 normalisations; :func:`sinkhorn` computes the same thing as one autograd node with a
    hand-written backward. Kept as the definition the tests and the benchmark compare against.
    """
    _check_sinkhorn_args(logits, iters)
    m = torch.softmax(logits.to(_compute_dtype(logits)), dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


# The iterations run in a token-minor layout: M for all tokens as one [n, n, T] tensor (axis 0 = j, the row
# index; axis 1 = k, the column index; axis 2 = t). A row or column sum is then a sum of n contiguous T-vectors
# and the divisions broadcast along contiguous memory; in [T, n, n] the same ops reduce and broadcast over
# axes of length n (~4), which CPU kernels handle ~6-8x slower (measured at T = 4096). The softmax stays in
# [T, n, n] (the plain version's op on the same values, so bit-identical) although torch's softmax over a
# last axis of 4 is ~20x slower than over axis 1 of [n, n, T]: it runs once, ~10% of the forward + backward
# at T = 256, ~20% at T = 4096, and the other layout's kernel rounds 1 ulp differently in ~17% of entries.
_COL_AXIS = 0  # Σ_j M_jk: column sums, shape [1, n, T]
_ROW_AXIS = 1  # Σ_k M_jk: row sums, shape [n, 1, T]


def _sinkhorn_forward(logits: torch.Tensor, iters: int, eps: float, keep_steps: bool):
    """Sinkhorn forward without autograd: logits [T, n, n] -> (M [T, n, n], saved or None).

    With ``keep_steps`` it also returns what the backward needs, in the [n, n, T] layout: ``p`` =
    softmax_k(L) and, for every normalisation step s = 0 .. 2·iters − 2 (even s: columns, odd s: rows), its
    output Y_s and its denominator D_s = Σ Y_{s−1} + eps along the normalised axis; Y_{2·iters−2} is a
    permuted view of the returned M. Per token that is (2·iters)·n² + (2·iters − 1)·n values with the output:
    3.1 KB at n = 4, iters = 20 in fp32 — what the plain-autograd version keeps too (each division saves its
    numerator and denominator). Without ``keep_steps`` the steps divide one buffer in place.
    """
    dtype = _compute_dtype(logits)
    t, n, _ = logits.shape
    steps = 2 * iters - 1
    out = torch.empty((t, n, n), dtype=dtype, device=logits.device)
    out_nnt = out.permute(1, 2, 0)  # the last step writes M straight into [T, n, n]
    p = torch.softmax(logits.to(dtype), dim=-1).permute(1, 2, 0).contiguous()
    # eps as a 0-dim tensor of the compute dtype: the same value as the Python float after its conversion,
    # converted once here instead of once per op
    eps_t = torch.tensor(eps, dtype=dtype, device=logits.device)
    m = torch.add(p, eps_t) if keep_steps else p.add_(eps_t)  # p itself is kept for the softmax backward
    ys, ds = [], []
    for s in range(steps):
        d = torch.sum(m, dim=_COL_AXIS if s % 2 == 0 else _ROW_AXIS, keepdim=True).add_(eps_t)
        if s == steps - 1:
            m = torch.div(m, d, out=out_nnt)
        elif keep_steps:
            m = torch.div(m, d)
        else:
            m.div_(d)
        ys.append(m)
        ds.append(d)
    return out, ((p, ys, ds) if keep_steps else None)


def _sinkhorn_backward(
    grad_out: torch.Tensor, p: torch.Tensor, ys: list[torch.Tensor], ds: list[torch.Tensor], logits_dtype: torch.dtype
) -> torch.Tensor:
    """∂L from ∂M, the saved steps reversed by hand (layout [n, n, T]; returns [T, n, n] in ``logits_dtype``).

    One normalisation Y = X / (S + eps), S = Σ X along the axis (D = S + eps, constant along it):
        ∂X = (∂Y − Σ(∂Y ⊙ Y)) / D               (Σ along the same axis, broadcast back)
    The row softmax p = softmax_k(L) (the +eps has no gradient):
        ∂L = p ⊙ (∂p − Σ_k(∂p ⊙ p))
    4 ops per step (mul, sum, sub_, div_) updating one buffer in place.
    """
    n, _, t = p.shape
    g = torch.empty_like(p)
    g.copy_(grad_out.permute(1, 2, 0))  # a private fp32/fp64 copy: updated in place below
    prod = torch.empty_like(p)
    dot = (
        torch.empty((1, n, t), dtype=p.dtype, device=p.device),
        torch.empty((n, 1, t), dtype=p.dtype, device=p.device),
    )
    for s in range(len(ys) - 1, -1, -1):
        axis = _COL_AXIS if s % 2 == 0 else _ROW_AXIS
        torch.mul(g, ys[s], out=prod)
        g.sub_(torch.sum(prod, dim=axis, keepdim=True, out=dot[axis])).div_(ds[s])
    torch.mul(g, p, out=prod)
    g.sub_(torch.sum(prod, dim=_ROW_AXIS, keepdim=True, out=dot[_ROW_AXIS]))
    grad_logits = torch.empty((t, n, n), dtype=logits_dtype, device=p.device)
    torch.mul(g, p, out=grad_logits.permute(1, 2, 0))  # computed in p.dtype, rounded once to logits_dtype
    return grad_logits


class _SinkhornFn(torch.autograd.Function):
    """:func:`sinkhorn_autograd` as one autograd node: in-place forward, hand-written backward.

    Keeps every step's output and denominator (see :func:`_sinkhorn_forward`) instead of recomputing the
    forward in backward: recomputation would cut the saved memory from 3.1 KB to 64 B per token and site
    (n = 4, iters = 20, fp32) but add a second forward to the backward (3 more ops per step on top of its 4,
    plus the softmax), and the memory kept equals what the plain-autograd version kept (3184 B per token,
    measured with saved-tensor hooks in benchmarks/bench_mhc_cpu.py). The Triton kernel (GPU) recomputes.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        out, (p, ys, ds) = _sinkhorn_forward(logits, iters, eps, keep_steps=True)
        # ys[-1] is a view of out: saved as out (an output) and re-permuted in backward
        ctx.save_for_backward(p, out, *ys[:-1], *ds)
        ctx.steps = len(ds)
        ctx.logits_dtype = logits.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        p, out, *saved = ctx.saved_tensors
        ys = saved[: ctx.steps - 1] + [out.permute(1, 2, 0)]
        ds = saved[ctx.steps - 1 :]
        return _sinkhorn_backward(grad_out, p, ys, ds, ctx.logits_dtype), None, None


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project ``logits`` [T, n, n] onto (nearly) doubly-stochastic matrices, §3.2 step 5.

    M = softmax_k(L) + eps                      (row softmax)
    M ← M / (Σ_j M_jk + eps)                    (column normalise)
    repeat iters − 1 times:  M ← M / (Σ_k M_jk + eps)  (rows),  M ← M / (Σ_j M_jk + eps)  (columns)

    The last step is a column normalisation, so columns sum to 1 up to eps; rows approximately.

    Same formulas and op order as :func:`sinkhorn_autograd`, run as one autograd node (:class:`_SinkhornFn`)
    with the iterations in a [n, n, T] layout and a hand-written backward (no double backward). The output
    is bit-identical to :func:`sinkhorn_autograd` for n ≤ 4 (same softmax op; torch sums ≤ 4 terms in the same
    order along either axis; IEEE division); for larger n the sums may add in another order (last-bit
    differences). The gradient is the same derivative evaluated in another order: ~2e-7 relative in fp32.
    """
    _check_sinkhorn_args(logits, iters)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SinkhornFn.apply(logits, iters, eps)
    with torch.no_grad():
        return _sinkhorn_forward(logits, iters, eps, keep_steps=False)[0]


def _rms_mix(x: torch.Tensor, fn: torch.Tensor, rms_eps: float, dtype: torch.dtype) -> torch.Tensor:
    """mix = (vec(X) · fnᵀ) · r with r = 1/sqrt(mean(vec(X)²) + rms_eps); x [T, n, d] -> [T, rows]."""
    flat = x.reshape(x.shape[0], -1).to(dtype)
    # mean(x²) as ‖x‖²/(n·d): one fused pass forward and backward over the n·d-wide rows (CPU: 1.5x faster
    # than square().mean() at d = 1024)
    ms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square() / flat.shape[-1]
    return (flat @ fn.to(dtype).t()) * torch.rsqrt(ms + rms_eps)


def mhc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    rms_eps: float,
    hc_eps: float,
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC "pre" side (§3.2 steps 1-6): x [T, n, d] -> (x_in [T, d] in x.dtype, post [T, n], comb [T, n, n])."""
    _check(x.dim() == 3, f"mhc_pre: x must be [T, n, d], got {tuple(x.shape)}")
    t, n, d = x.shape
    rows = (2 + n) * n
    _check(
        tuple(fn.shape) == (rows, n * d),
        f"mhc_pre: fn must be [(2+n)*n, n*d] = [{rows}, {n * d}] for x {tuple(x.shape)}, got {tuple(fn.shape)}",
    )
    _check(tuple(base.shape) == (rows,), f"mhc_pre: base must be [{rows}], got {tuple(base.shape)}")
    _check(tuple(scale.shape) == (3,), f"mhc_pre: scale must be [3] (pre, post, comb), got {tuple(scale.shape)}")
    dtype = _compute_dtype(x, fn, base, scale)
    mix = _rms_mix(x, fn, rms_eps, dtype)
    base = base.to(dtype)
    scale = scale.to(dtype)
    pre = torch.sigmoid(mix[:, :n] * scale[0] + base[:n]) + hc_eps
    post = 2.0 * torch.sigmoid(mix[:, n : 2 * n] * scale[1] + base[n : 2 * n])
    comb_logits = (mix[:, 2 * n :] * scale[2] + base[2 * n :]).view(t, n, n)
    comb = sinkhorn(comb_logits, iters, hc_eps)
    x_in = torch.einsum("tn,tnd->td", pre, x.to(dtype)).to(x.dtype)  # Σ_j pre_j X_j (no [T, n, d] product)
    return x_in, post, comb


def mhc_post(o: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC "post" side (§3.2 step 7): X_new[k] = post_k · o + Σ_j comb_{jk} X[j]; returns [T, n, d] in x.dtype."""
    _check(x.dim() == 3, f"mhc_post: x must be [T, n, d], got {tuple(x.shape)}")
    t, n, d = x.shape
    _check(tuple(o.shape) == (t, d), f"mhc_post: o must be [T, d] = [{t}, {d}], got {tuple(o.shape)}")
    _check(tuple(post.shape) == (t, n), f"mhc_post: post must be [{t}, {n}], got {tuple(post.shape)}")
    _check(tuple(comb.shape) == (t, n, n), f"mhc_post: comb must be [{t}, {n}, {n}], got {tuple(comb.shape)}")
    dtype = _compute_dtype(o, x, post, comb)
    # one batched product [combᵀ | post] · [X ; o] ([T, n, n+1] x [T, n+1, d]) instead of a product plus a
    # broadcast outer product and a sum: fewer passes over the [T, n, d] streams (CPU: 1.6x at d = 1024)
    lhs = torch.cat([comb.to(dtype).transpose(-1, -2), post.to(dtype).unsqueeze(-1)], dim=-1)
    rhs = torch.cat([x.to(dtype), o.to(dtype).unsqueeze(1)], dim=1)
    return torch.bmm(lhs, rhs).to(x.dtype)


def hc_head(
    x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, rms_eps: float, hc_eps: float
) -> torch.Tensor:
    """Final stream collapse (§3.3): a_j = σ(α · mix_j + b_j) + hc_eps, y = Σ_j a_j X[j]; x [T, n, d] -> [T, d]."""
    _check(x.dim() == 3, f"hc_head: x must be [T, n, d], got {tuple(x.shape)}")
    _, n, d = x.shape
    _check(tuple(fn.shape) == (n, n * d), f"hc_head: fn must be [n, n*d] = [{n}, {n * d}], got {tuple(fn.shape)}")
    _check(tuple(base.shape) == (n,), f"hc_head: base must be [{n}], got {tuple(base.shape)}")
    _check(tuple(scale.shape) == (1,), f"hc_head: scale must be [1], got {tuple(scale.shape)}")
    dtype = _compute_dtype(x, fn, base, scale)
    mix = _rms_mix(x, fn, rms_eps, dtype)
    a = torch.sigmoid(mix * scale.to(dtype) + base.to(dtype)) + hc_eps
    return torch.einsum("tn,tnd->td", a, x.to(dtype)).to(x.dtype)


register("sinkhorn", reference=sinkhorn)
register("mhc_pre", reference=mhc_pre)
register("mhc_post", reference=mhc_post)
register("hc_head", reference=hc_head)
