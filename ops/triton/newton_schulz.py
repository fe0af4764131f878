"""Batched Newton-Schulz (Muon, V4 hybrid schedule) with symmetric Gram kernels in Triton.

Reference and math: ``ops/newton_schulz.py`` (docs/MODEL.md §12.2). For a batch X [E, s, l] (wide
orientation s ≤ l; taller inputs are transposed as in the reference), X₀ = X / ‖X‖_F and per iteration

    A = X Xᵀ                 (symmetric: only tiles (i, j), i ≤ j, are computed, each stored twice)
    B = b A + c A²           (A² symmetric as well: same one-triangle scheme, b·A fused in the epilogue)
    X ← a X + B X            (full GEMM with the a·X term fused in the epilogue)

Flops per iteration 2s²l + 2s³ + 2s²l (full count, ``ops.newton_schulz.ns_flops``); the triangle schemes do
(s/BM)(s/BM+1)/2 of (s/BM)² tiles, i.e. ~½ of the first two terms. One launch per stage covers all E
matrices (grid axis 0), so batching same-shape matrices costs no extra launches.

Precision: ``fp32=False`` (the fast path): X, A, B stored in bf16, every dot accumulates in fp32 — the same
rounding points as the reference's bf16 bmm path. ``fp32=True``: fp32 storage; on the GPU dots use 3-pass
tf32 (≈ fp32 accuracy). ``reduce`` (sharded Gram all-reduce) is applied to A between the first two kernels,
exactly where the reference applies it.

On the GPU, the first call for a batch shape times one iteration of three variants (all Triton; the two
symmetric Triton kernels + cuBLAS for the full update GEMM; all cuBLAS = the reference's iteration) and keeps
the fastest (``_choose``; ``V4_NS_VARIANT=triton|mixed|torch`` forces one): on the H200 the all-Triton path
was slower than cuBLAS for 64×2048×1024 bf16 (18.1 vs 14.9 ms), so the batched path never loses to torch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ops import newton_schulz as _ref
from ops.triton import native, new_empty


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gram_sym_kernel(
    x_ptr,
    a_ptr,
    ti_ptr,
    tj_ptr,
    S,
    L,
    coef_b,
    coef_c,
    POLY: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """POLY=False: A = X Xᵀ (X [E,S,L]). POLY=True: out = b·A + c·A·A (x_ptr = A [E,S,S], L = S).
    One program per upper-triangle tile (ti ≤ tj) of one matrix; the tile is stored at (ti,tj) and (tj,ti)."""
    e = tl.program_id(0)
    p = tl.program_id(1)
    ti = tl.load(ti_ptr + p)
    tj = tl.load(tj_ptr + p)
    rows = ti * BM + tl.arange(0, BM)
    cols = tj * BM + tl.arange(0, BM)
    xb = x_ptr + e.to(tl.int64) * S * L
    acc = tl.zeros([BM, BM], dtype=tl.float32)
    for k0 in range(0, L, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(xb + rows[:, None] * L + ks[None, :], mask=(rows[:, None] < S) & (ks[None, :] < L), other=0.0)
        # second operand [BK, BM]: X[cols, ks]ᵀ (gram) / A[ks, cols] = A[cols, ks]ᵀ (A symmetric)
        bt = tl.load(xb + cols[None, :] * L + ks[:, None], mask=(cols[None, :] < S) & (ks[:, None] < L), other=0.0)
        if UPCAST:
            a, bt = a.to(tl.float32), bt.to(tl.float32)
        acc += tl.dot(a, bt, input_precision=PREC)
    if POLY:
        a_ij = tl.load(
            xb + rows[:, None] * L + cols[None, :], mask=(rows[:, None] < S) & (cols[None, :] < S), other=0.0
        ).to(tl.float32)
        acc = coef_b * a_ij + coef_c * acc
    out = acc.to(a_ptr.dtype.element_ty)
    ob = a_ptr + e.to(tl.int64) * S * S
    m = (rows[:, None] < S) & (cols[None, :] < S)
    tl.store(ob + rows[:, None] * S + cols[None, :], out, mask=m)
    tl.store(ob + cols[None, :] * S + rows[:, None], out, mask=m & (ti != tj))


@triton.jit
def _ns_update_kernel(
    b_ptr,
    x_ptr,
    y_ptr,
    S,
    L,
    coef_a,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Y = a·X + B·X for B [E,S,S], X [E,S,L]; one program per (matrix, BM×BN output tile)."""
    e = tl.program_id(0)
    pm = tl.program_id(1)
    pn = tl.program_id(2)
    rows = pm * BM + tl.arange(0, BM)
    cols = pn * BN + tl.arange(0, BN)
    bb = b_ptr + e.to(tl.int64) * S * S
    xb = x_ptr + e.to(tl.int64) * S * L
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, S, BK):
        ks = k0 + tl.arange(0, BK)
        bt = tl.load(bb + rows[:, None] * S + ks[None, :], mask=(rows[:, None] < S) & (ks[None, :] < S), other=0.0)
        xt = tl.load(xb + ks[:, None] * L + cols[None, :], mask=(ks[:, None] < S) & (cols[None, :] < L), other=0.0)
        if UPCAST:
            bt, xt = bt.to(tl.float32), xt.to(tl.float32)
        acc += tl.dot(bt, xt, input_precision=PREC)
    m = (rows[:, None] < S) & (cols[None, :] < L)
    x0 = tl.load(xb + rows[:, None] * L + cols[None, :], mask=m, other=0.0).to(tl.float32)
    acc += coef_a * x0
    tl.store(y_ptr + e.to(tl.int64) * S * L + rows[:, None] * L + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=m)


_TRI_CACHE: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _triangle(nt: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (nt, str(device))
    if key not in _TRI_CACHE:
        iu = torch.triu_indices(nt, nt)
        _TRI_CACHE[key] = (iu[0].to(torch.int32).to(device), iu[1].to(torch.int32).to(device))
    return _TRI_CACHE[key]


def _config(dtype: torch.dtype) -> dict:
    if _interp():
        return dict(BM=16, BN=16, BK=16, warps=4, stages=1)
    if dtype == torch.float32:
        return dict(BM=64, BN=64, BK=32, warps=4, stages=3)
    return dict(BM=128, BN=128, BK=64, warps=8, stages=3)


VARIANTS = ("triton", "mixed", "torch")
_CHOICE: dict = {}  # (shape, dtype, device) -> variant chosen by timing on the GPU


def _step(variant: str, Y, A, B, Y2, a: float, b: float, c: float, reduce, cfg: dict, prec: str, ti, tj):
    """One NS iteration Y -> a·Y + (b·A + c·A²)·Y with A = Y·Yᵀ; returns (new Y, A, B).

    * triton: symmetric one-triangle Gram and polynomial kernels + the fused update kernel;
    * mixed:  the two symmetric kernels (half the tiles) + cuBLAS ``baddbmm`` for the full update GEMM;
    * torch:  cuBLAS ``bmm``/``baddbmm`` for all three (exactly the reference's iteration)."""
    E, s, l = Y.shape
    bm = cfg["BM"]
    kw = dict(num_warps=cfg["warps"], num_stages=cfg["stages"], UPCAST=_interp())
    if variant == "torch":
        A = torch.bmm(Y, Y.mT, out=A)
    else:
        _gram_sym_kernel[(E, ti.numel())](
            Y, A, ti, tj, s, l, 0.0, 0.0, POLY=False, BM=bm, BK=cfg["BK"], PREC=prec, **kw
        )
    if reduce is not None:
        A = reduce(A)
    if variant == "torch":
        B = torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)
    else:
        _gram_sym_kernel[(E, ti.numel())](
            A, B, ti, tj, s, s, float(b), float(c), POLY=True, BM=bm, BK=cfg["BK"], PREC=prec, **kw
        )
    if variant == "triton":
        _ns_update_kernel[(E, triton.cdiv(s, bm), triton.cdiv(l, cfg["BN"]))](
            B, Y, Y2, s, l, float(a), BM=bm, BN=cfg["BN"], BK=cfg["BK"], PREC=prec, **kw
        )
    else:
        Y2 = torch.baddbmm(Y, B, Y, beta=a, alpha=1.0, out=Y2)
    return Y2, A, B


def _choose(Y: torch.Tensor, abc: tuple[float, float, float], cfg: dict, prec: str, ti, tj) -> str:
    """The fastest variant for this batch shape on this GPU, timed once (CUDA events, no ``reduce``: the
    hook may be a collective) and cached. ``V4_NS_VARIANT`` forces one. Off the GPU: ``triton``."""
    forced = os.environ.get("V4_NS_VARIANT", "")
    if forced in VARIANTS:
        return forced
    if _interp() or not Y.is_cuda:
        return "triton"
    key = (tuple(Y.shape), Y.dtype, str(Y.device))
    if key not in _CHOICE:
        a, b, c = abc
        A = torch.empty(Y.shape[0], Y.shape[1], Y.shape[1], device=Y.device, dtype=Y.dtype)
        B = torch.empty_like(A)
        Y2 = torch.empty_like(Y)
        best, best_ms = "torch", float("inf")
        for v in VARIANTS:
            _step(v, Y, A, B, Y2, a, b, c, None, cfg, prec, ti, tj)  # warm-up / compile
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
            for _ in range(3):
                _step(v, Y, A, B, Y2, a, b, c, None, cfg, prec, ti, tj)
            ev1.record()
            ev1.synchronize()
            ms = ev0.elapsed_time(ev1)
            if ms < best_ms * 0.98 or (v == "torch" and ms <= best_ms):
                best, best_ms = v, ms
        _CHOICE[key] = best
    return _CHOICE[key]


def last_choice() -> dict:
    """Variants chosen so far: {(shape, dtype, device): variant} (for benchmarks and logs)."""
    return dict(_CHOICE)


def _iterate(Y: torch.Tensor, iters: list[tuple[float, float, float]], reduce) -> torch.Tensor:
    """Run the NS iterations on the already normalised, contiguous batch Y [E, s, l] (dtype = compute)."""
    E, s, l = Y.shape
    cfg = _config(Y.dtype)
    prec = "ieee" if _interp() else ("tf32x3" if Y.dtype == torch.float32 else "tf32")
    nt = triton.cdiv(s, cfg["BM"])
    ti, tj = _triangle(nt, Y.device)
    variant = _choose(Y, iters[0], cfg, prec, ti, tj) if iters else "triton"
    A = new_empty((E, s, s), device=Y.device, dtype=Y.dtype)
    B = new_empty((E, s, s), device=Y.device, dtype=Y.dtype)
    Y2 = new_empty((E, s, l), device=Y.device, dtype=Y.dtype)
    # the interpreter's tl.dot mishandles bf16 operands: kernels upcast there (exact: bf16 ⊂ fp32)
    for a, b, c in iters:
        Yn, A, B = _step(variant, Y, A, B, Y2, a, b, c, reduce, cfg, prec, ti, tj)
        Y, Y2 = Yn, Y
    return Y


def newton_schulz(
    X: torch.Tensor, steps: _ref.NSSteps = _ref.V4_NS_STEPS, fp32: bool = True, reduce: _ref.Reduce = None
) -> torch.Tensor:
    """Triton Newton-Schulz, same contract as ``ops.newton_schulz.newton_schulz`` (``[..., n, m]`` -> same)."""
    if X.dtype == torch.float64 or not native(X) or X.dim() < 2:
        return _ref.newton_schulz(X, steps, fp32, reduce)
    Y, transposed = _ref._prepare(X, reduce)
    cdt = _ref._compute_dtype(X, fp32)
    norm = _ref._frobenius(Y, reduce).clamp_min(_ref.EPS)
    Y = (Y.to(norm.dtype) / norm).to(cdt).contiguous()
    Y = _iterate(Y, _ref.expand_steps(steps), reduce)
    return _ref._finish(Y, X, transposed)
