"""Hybrid sparse attention of DeepSeek-V4 in Triton: one online softmax over window ∪ compressed entries + sink.

Reference and contract: ``ops/sparse_attention.hybrid_attention`` (docs/MODEL.md §4.3). For head h of query
t, J_t = W_t ∪ C_t, single shared K=V head (v_j = k_j):

    z_j = scale · q_{t,h}·k_j,   lse = log(Σ_{j∈J_t} e^{z_j} + e^{z'_h}),   o = Σ_j e^{z_j − lse} k_j

* W_t = [max(t − window + 1, seg_start[t]), t];  C_t = comp_idx[t] (−1 = empty; CSA) or [lo[t], hi[t]) (HCA).
* The sink enters as the initial state of the online softmax: running max m = z'_h, running sum l = 1.
* Nothing of size [S, S] or [S, N] is formed: the forward keeps [BH, BN] score tiles in registers.

Forward: one program per (query token, block of BH heads). The K=V tile [BN, D] is loaded once for all
BH heads of the query (MQA), which is where the arithmetic intensity comes from (BH = H when it fits).
Exponentials are base 2 (z·log₂e) with lse returned in natural log.

Backward (FlashAttention-style recompute from lse; nothing [S, entries] stored), with
Δ_{t,h} = Σ_d dO·O − ∂lse (the ∂lse term makes lse a differentiable output too):

    p = exp(z − lse),  dp_j = dO·k_j,  ds_j = p_j (dp_j − Δ)
    dq = scale · Σ_j ds_j k_j                      (query-centric kernel, same loops as the forward)
    dk_j = Σ_{t,h} scale · ds_j q_{t,h} + p_j dO_{t,h}     (k = v: key and value gradients added)
    d sink_h = −Σ_t e^{z'_h − lse_{t,h}} Δ_{t,h}

dk of window keys and of range-visible (HCA) entries: key-centric kernel over the flattened (token, head)
query rows that can see a key block (contiguous in q's [B, S, H, D] layout), split into query chunks whose
fp32 partial sums are added in a fixed order (deterministic). dk of top-k selected entries (CSA): the
query-centric kernel adds its [BN, D] contributions with fp32 atomics (order not deterministic; the values
agree to fp32 rounding). Selected indices must be distinct per query (top-k output), and for the range
mode ``comp_lo``/``comp_hi`` must be non-decreasing in t (as ``ops.compressor.compressed_layout`` makes them).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ops import sparse_attention as _ref
from ops.triton import native, new_empty

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _fwd_tile(q, k, valid, m_i, l_i, acc, qk_scale, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=PREC)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p, k.to(tl.float32), input_precision=PREC)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    kv_ptr,
    ck_ptr,
    sink_ptr,
    seg_ptr,
    lo_ptr,
    hi_ptr,
    idx_ptr,
    o_ptr,
    lse_ptr,
    S,
    H,
    N,
    KSEL,
    qk_scale,
    window,
    D: tl.constexpr,
    DP: tl.constexpr,
    BH: tl.constexpr,
    BN: tl.constexpr,
    COMP: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)  # b * S + t
    hb = tl.program_id(1)
    b = pid // S
    t = pid % S
    pid64 = pid.to(tl.int64)
    offs_h = hb * BH + tl.arange(0, BH)
    hmask = offs_h < H
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    qm = hmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + (pid64 * H + offs_h[:, None]) * D + offs_d[None, :], mask=qm, other=0.0)
    m_i = tl.load(sink_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
    l_i = tl.full([BH], 1.0, dtype=tl.float32)
    acc = tl.zeros([BH, DP], dtype=tl.float32)
    seg = tl.load(seg_ptr + pid)
    lo = tl.maximum(t - window + 1, seg)
    hi = t + 1
    kvb = kv_ptr + b.to(tl.int64) * S * D
    for k0 in range(lo, hi, BN):
        offs_n = k0 + tl.arange(0, BN)
        nmask = offs_n < hi
        k = tl.load(kvb + offs_n[:, None] * D + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        m_i, l_i, acc = _fwd_tile(q, k, nmask, m_i, l_i, acc, qk_scale, UPCAST, PREC)
    ckb = ck_ptr + b.to(tl.int64) * N * D
    if COMP == 1:
        clo = tl.load(lo_ptr + pid)
        chi = tl.load(hi_ptr + pid)
        for k0 in range(clo, chi, BN):
            offs_n = k0 + tl.arange(0, BN)
            nmask = offs_n < chi
            k = tl.load(ckb + offs_n[:, None] * D + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
            m_i, l_i, acc = _fwd_tile(q, k, nmask, m_i, l_i, acc, qk_scale, UPCAST, PREC)
    if COMP == 2:
        for k0 in range(0, KSEL, BN):
            offs_j = k0 + tl.arange(0, BN)
            idx = tl.load(idx_ptr + pid64 * KSEL + offs_j, mask=offs_j < KSEL, other=-1)
            nmask = (idx >= 0) & (idx < N)
            k = tl.load(
                ckb + idx[:, None].to(tl.int64) * D + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0
            )
            m_i, l_i, acc = _fwd_tile(q, k, nmask, m_i, l_i, acc, qk_scale, UPCAST, PREC)
    o = acc / l_i[:, None]
    tl.store(o_ptr + (pid64 * H + offs_h[:, None]) * D + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=qm)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + pid64 * H + offs_h, lse, mask=hmask)


@triton.jit
def _dq_tile(q, do, k, valid, lse2, delta, dq, qk_scale, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Returns (dq + ds·k, p, ds) for one key tile (p, ds: [BH, BN] fp32, zero where invalid)."""
    if UPCAST:
        kf = k.to(tl.float32)
        s = tl.dot(q.to(tl.float32), tl.trans(kf), input_precision=PREC)
        dp = tl.dot(do.to(tl.float32), tl.trans(kf), input_precision=PREC)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        dp = tl.dot(do, tl.trans(k), input_precision=PREC)
    p = tl.where(valid, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
    ds = p * (dp - delta[:, None])
    if UPCAST:
        dq += tl.dot(ds, k.to(tl.float32), input_precision=PREC)
    else:
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq, p, ds


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,
    kv_ptr,
    ck_ptr,
    seg_ptr,
    lo_ptr,
    hi_ptr,
    idx_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    dck_ptr,
    S,
    H,
    N,
    KSEL,
    qk_scale,
    sm_scale,
    window,
    D: tl.constexpr,
    DP: tl.constexpr,
    BH: tl.constexpr,
    BN: tl.constexpr,
    COMP: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    hb = tl.program_id(1)
    b = pid // S
    t = pid % S
    pid64 = pid.to(tl.int64)
    offs_h = hb * BH + tl.arange(0, BH)
    hmask = offs_h < H
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    qm = hmask[:, None] & dmask[None, :]
    rows = (pid64 * H + offs_h[:, None]) * D + offs_d[None, :]
    q = tl.load(q_ptr + rows, mask=qm, other=0.0)
    do = tl.load(do_ptr + rows, mask=qm, other=0.0)
    lse2 = tl.load(lse_ptr + pid64 * H + offs_h, mask=hmask, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + pid64 * H + offs_h, mask=hmask, other=0.0)
    dq = tl.zeros([BH, DP], dtype=tl.float32)
    seg = tl.load(seg_ptr + pid)
    lo = tl.maximum(t - window + 1, seg)
    hi = t + 1
    kvb = kv_ptr + b.to(tl.int64) * S * D
    for k0 in range(lo, hi, BN):
        offs_n = k0 + tl.arange(0, BN)
        nmask = offs_n < hi
        k = tl.load(kvb + offs_n[:, None] * D + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        dq, p, ds = _dq_tile(q, do, k, hmask[:, None] & nmask[None, :], lse2, delta, dq, qk_scale, UPCAST, PREC)
    ckb = ck_ptr + b.to(tl.int64) * N * D
    if COMP == 1:
        clo = tl.load(lo_ptr + pid)
        chi = tl.load(hi_ptr + pid)
        for k0 in range(clo, chi, BN):
            offs_n = k0 + tl.arange(0, BN)
            nmask = offs_n < chi
            k = tl.load(ckb + offs_n[:, None] * D + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
            dq, p, ds = _dq_tile(q, do, k, hmask[:, None] & nmask[None, :], lse2, delta, dq, qk_scale, UPCAST, PREC)
    if COMP == 2:
        dckb = dck_ptr + b.to(tl.int64) * N * D
        for k0 in range(0, KSEL, BN):
            offs_j = k0 + tl.arange(0, BN)
            idx = tl.load(idx_ptr + pid64 * KSEL + offs_j, mask=offs_j < KSEL, other=-1)
            nmask = (idx >= 0) & (idx < N)
            km = nmask[:, None] & dmask[None, :]
            kp = idx[:, None].to(tl.int64) * D + offs_d[None, :]
            k = tl.load(ckb + kp, mask=km, other=0.0)
            dq, p, ds = _dq_tile(q, do, k, hmask[:, None] & nmask[None, :], lse2, delta, dq, qk_scale, UPCAST, PREC)
            if UPCAST:
                dk = tl.dot(tl.trans(ds), q.to(tl.float32), input_precision=PREC) * sm_scale + tl.dot(
                    tl.trans(p), do.to(tl.float32), input_precision=PREC
                )
            else:
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * sm_scale + tl.dot(
                    tl.trans(p.to(do.dtype)), do, input_precision=PREC
                )
            tl.atomic_add(dckb + kp, dk, mask=km)
    tl.store(dq_ptr + rows, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=qm)


@triton.jit
def _attn_bwd_dkv_kernel(
    q_ptr,
    k_ptr,
    seg_ptr,
    lo_ptr,
    hi_ptr,
    tlo_ptr,
    thi_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    part_ptr,
    S,
    H,
    NK,
    NKB,
    QC,
    qk_scale,
    sm_scale,
    window,
    D: tl.constexpr,
    DP: tl.constexpr,
    BM: tl.constexpr,
    BNK: tl.constexpr,
    MODE: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """Key-centric dk for a block of BNK keys (MODE 0: window keys = tokens; MODE 1: range-visible entries).
    Query rows r = t·H + h of batch b in [t_lo·H, t_hi·H), chunk pid_c of QC tokens; writes an fp32 partial."""
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    B_ = pid_k // NKB
    kb = pid_k % NKB
    b64 = B_.to(tl.int64)
    keys = kb * BNK + tl.arange(0, BNK)
    kmask = keys < NK
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    k = tl.load(
        k_ptr + (b64 * NK + keys[:, None]) * D + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0
    )
    if UPCAST:
        k = k.to(tl.float32)
    if MODE == 0:
        t_lo = kb * BNK
        t_hi = tl.minimum(S, kb * BNK + BNK + window - 1)
    else:
        t_lo = tl.load(tlo_ptr + pid_k)
        t_hi = tl.load(thi_ptr + pid_k)
    c_lo = t_lo + pid_c * QC
    c_hi = tl.minimum(t_hi, c_lo + QC)
    dk = tl.zeros([BNK, DP], dtype=tl.float32)
    for r0 in range(c_lo * H, c_hi * H, BM):
        r = r0 + tl.arange(0, BM)
        rmask = r < c_hi * H
        tok = r // H
        grow = b64 * S * H + r
        rm2 = rmask[:, None] & dmask[None, :]
        qr = tl.load(q_ptr + grow[:, None] * D + offs_d[None, :], mask=rm2, other=0.0)
        dor = tl.load(do_ptr + grow[:, None] * D + offs_d[None, :], mask=rm2, other=0.0)
        lse2 = tl.load(lse_ptr + grow, mask=rmask, other=0.0) * 1.4426950408889634
        dl = tl.load(delta_ptr + grow, mask=rmask, other=0.0)
        if MODE == 0:
            sg = tl.load(seg_ptr + b64 * S + tok, mask=rmask, other=0)
            valid = (
                (tok[:, None] >= keys[None, :])
                & (tok[:, None] - keys[None, :] < window)
                & (sg[:, None] <= keys[None, :])
            )
        else:
            lo = tl.load(lo_ptr + b64 * S + tok, mask=rmask, other=0)
            hi = tl.load(hi_ptr + b64 * S + tok, mask=rmask, other=0)
            valid = (lo[:, None] <= keys[None, :]) & (keys[None, :] < hi[:, None])
        valid = valid & rmask[:, None] & kmask[None, :]
        if UPCAST:
            qr = qr.to(tl.float32)
            dor = dor.to(tl.float32)
        s = tl.dot(qr, tl.trans(k), input_precision=PREC)
        dp = tl.dot(dor, tl.trans(k), input_precision=PREC)
        p = tl.where(valid, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = p * (dp - dl[:, None])
        dk += tl.dot(tl.trans(ds.to(qr.dtype)), qr, input_precision=PREC) * sm_scale + tl.dot(
            tl.trans(p.to(dor.dtype)), dor, input_precision=PREC
        )
    tl.store(
        part_ptr + ((pid_c * (tl.num_programs(0) // NKB) + b64) * NK + keys[:, None]) * D + offs_d[None, :],
        dk,
        mask=kmask[:, None] & dmask[None, :],
    )


def _prec(q: torch.Tensor) -> str:
    """fp32 inputs: 3-pass tf32 on the GPU (≈ fp32 accuracy); bf16/fp16 operands are exact in any mode."""
    if _interp():
        return "ieee"
    return "tf32x3" if q.dtype == torch.float32 else "tf32"  # the latter is Triton's default (unused for bf16)


SMEM_LIMIT = 232448  # shared memory per block on sm_90 (H100/H200), bytes
SMEM_BUDGET = 200 * 1024  # what a config may use by the estimate below (headroom for the compiler)

# Candidates in order of preference: (rows = heads BH / query rows BM, keys BN / BNK, num_stages).
_CAND_SMALL_D = [(64, 64, 2), (64, 32, 2), (32, 64, 2), (32, 32, 2), (32, 32, 1), (16, 32, 1), (16, 16, 1)]
_CAND_LARGE_D = [(64, 32, 2), (64, 32, 1), (32, 32, 2), (32, 32, 1), (32, 16, 1), (16, 32, 1), (16, 16, 1)]


def smem_estimate(kernel: str, rows: int, keys: int, D: int, esz: int, stages: int = 1, comp: int = 0) -> int:
    """Upper estimate (bytes) of the shared memory the compiler gives one program of ``kernel``.

    Every ``tl.dot`` operand tile is staged in shared memory, one buffer per distinct use (a tile used as
    A of one dot and B of another, or as Kᵀ and K, gets its own), the tiles loaded inside the key / query
    loop once per pipeline stage. DP = next_pow2(D) columns; esz = bytes per element of the dot inputs.
    Calibrated on sm_90 compilations (``python -m ops.triton.sm90check`` prints both numbers and fails when
    a compilation needs more than this estimate), e.g. D=512: fwd 32×32 bf16 96 KB / fp32 192 KB, dq 32×32
    bf16 128 KB / fp32 320 KB, dkv 64×32 bf16 288 KB / fp32 384 KB.

    * fwd: q [rows, DP] once; K tile as Kᵀ (scores) and K (P·V) per stage; P tile [rows, keys].
    * dq:  q, dO [rows, DP]; K tile three times per stage (Kᵀ for scores and dP, K for dS·K; fp32 keeps a
           third copy); P, dS tiles; CSA (comp = 2) adds q, dO as B operands of the selected-entry dK
           (dSᵀ·q, Pᵀ·dO) and the transposed P, dS tiles.
    * dkv: q, dO rows [rows, DP] each as A (scores, dP) and B (dK) per stage; the key tile [keys, DP] once;
           Pᵀ, dSᵀ tiles.
    """
    DP = triton.next_power_of_2(D)
    st = max(1, int(stages))
    if kernel == "fwd":
        el = rows * DP + 2 * keys * DP * st + rows * keys
    elif kernel == "dq":
        el = 2 * rows * DP + 3 * keys * DP * st + 2 * rows * keys
        if comp == 2:
            el += 2 * rows * DP + 2 * rows * keys
    elif kernel == "dkv":
        el = 4 * rows * DP * st + keys * DP + 2 * rows * keys
    else:
        raise ValueError(kernel)
    return int(el * esz)


def _pick(kernel: str, H: int, D: int, esz: int, comp: int) -> Optional[dict]:
    cap = max(16, triton.next_power_of_2(H)) if kernel != "dkv" else 1 << 30
    for rows, keys, st in _CAND_SMALL_D if D <= 128 else _CAND_LARGE_D:
        if rows > cap:
            continue
        if smem_estimate(kernel, rows, keys, D, esz, st, comp) <= SMEM_BUDGET:
            return dict(rows=rows, keys=keys, warps=4 if D <= 128 else 8, stages=st)
    return None


def _config(H: int, D: int, dtype: torch.dtype, comp: int, interp: Optional[bool] = None) -> Optional[dict]:
    """Block sizes of the three kernels for H heads of dim D, or None when no candidate fits the budget
    (the caller then uses the reference). fwd/dq: BH heads × BN keys; dkv: BM query rows × BNK keys."""
    if _interp() if interp is None else interp:
        return dict(
            BH=16, BN=16, warps=4, stages=1, BHQ=16, BNQ=16, warps_q=4, stages_q=1, BM=16, BNK=16, warps_k=4, stages_k=1
        )
    esz = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    f = _pick("fwd", H, D, esz, comp)
    q = _pick("dq", H, D, esz, comp)
    k = _pick("dkv", H, D, esz, comp)
    if f is None or q is None or k is None:
        return None
    return dict(
        BH=f["rows"],
        BN=f["keys"],
        warps=f["warps"],
        stages=f["stages"],
        BHQ=q["rows"],
        BNQ=q["keys"],
        warps_q=q["warps"],
        stages_q=q["stages"],
        BM=k["rows"],
        BNK=k["keys"],
        warps_k=k["warps"],
        stages_k=k["stages"],
    )


def config_smem(H: int, D: int, dtype: torch.dtype, comp: int) -> dict:
    """Estimated shared memory (bytes) of each kernel under the compiled (GPU) config of ``_config``."""
    cfg = _config(H, D, dtype, comp, interp=False)
    if cfg is None:
        return {}
    esz = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    return dict(
        fwd=smem_estimate("fwd", cfg["BH"], cfg["BN"], D, esz, cfg["stages"], comp),
        dq=smem_estimate("dq", cfg["BHQ"], cfg["BNQ"], D, esz, cfg["stages_q"], comp),
        dkv=smem_estimate("dkv", cfg["BM"], cfg["BNK"], D, esz, cfg["stages_k"], comp),
    )


def _dkv(q, keys, seg, lo, hi, do, lse, delta, window, scale, mode, cfg):
    """dk (fp32 [B, NK, D]) of window keys (mode 0, keys = kv) or range-visible entries (mode 1)."""
    B, S, H, D = q.shape
    NK = keys.shape[1]
    bnk = cfg["BNK"]
    nkb = triton.cdiv(NK, bnk)
    dev = q.device
    if mode == 0:
        qc = bnk + window - 1
        tlo = thi = seg  # unused
        chunks = 1
    else:
        n0 = (torch.arange(nkb, device=dev) * bnk).to(torch.int32)
        n1 = torch.clamp(n0 + bnk, max=NK)
        # queries seeing any entry of [n0, n1): hi[t] > n0 and lo[t] < n1 (lo, hi non-decreasing in t)
        tlo = torch.searchsorted(hi.contiguous(), n0.expand(B, -1).contiguous(), right=True).to(torch.int32)
        thi = torch.searchsorted(lo.contiguous(), n1.expand(B, -1).contiguous(), right=False).to(torch.int32)
        thi = torch.maximum(thi, tlo)
        span = int((thi - tlo).max().item()) if nkb > 0 else 0
        qc = max(1, min(span, max(256, 8192 // max(H, 1)) if not _interp() else 16))
        chunks = max(1, triton.cdiv(span, qc))
        tlo, thi = tlo.reshape(-1).contiguous(), thi.reshape(-1).contiguous()
    part = new_empty((chunks, B, NK, D), device=dev, dtype=torch.float32)
    if NK == 0:
        return torch.zeros(B, 0, D, device=dev, dtype=torch.float32)
    _attn_bwd_dkv_kernel[(B * nkb, chunks)](
        q,
        keys,
        seg,
        lo,
        hi,
        tlo,
        thi,
        do,
        lse,
        delta,
        part,
        S,
        H,
        NK,
        nkb,
        qc,
        scale * LOG2E,
        scale,
        window,
        D=D,
        DP=triton.next_power_of_2(D),
        BM=cfg["BM"],
        BNK=bnk,
        MODE=mode,
        UPCAST=_interp(),
        PREC=_prec(q),
        num_warps=cfg["warps_k"],
        num_stages=cfg["stages_k"],
    )
    return part.sum(0) if chunks > 1 else part[0]


class _HybridAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, sinks, comp_kv, scale, window, seg, lo, hi, idx, comp):
        B, S, H, D = q.shape
        N = comp_kv.shape[1] if comp_kv is not None else 0
        ck = comp_kv if comp_kv is not None else kv
        ksel = idx.shape[2] if idx is not None else 0
        o = new_empty((B, S, H, D), device=q.device, dtype=q.dtype)
        lse = new_empty((B, S, H), device=q.device, dtype=torch.float32)
        cfg = _config(H, D, q.dtype, comp)
        idx_ = idx if idx is not None else seg
        _attn_fwd_kernel[(B * S, triton.cdiv(H, cfg["BH"]))](
            q,
            kv,
            ck,
            sinks,
            seg,
            lo,
            hi,
            idx_,
            o,
            lse,
            S,
            H,
            N,
            ksel,
            scale * LOG2E,
            window,
            D=D,
            DP=triton.next_power_of_2(D),
            BH=cfg["BH"],
            BN=cfg["BN"],
            COMP=comp,
            UPCAST=_interp(),
            PREC=_prec(q),
            num_warps=cfg["warps"],
            num_stages=cfg["stages"],
        )
        ctx.save_for_backward(q, kv, sinks, comp_kv, seg, lo, hi, idx, o, lse)
        ctx.cfg = (scale, window, comp)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, kv, sinks, comp_kv, seg, lo, hi, idx, o, lse = ctx.saved_tensors
        scale, window, comp = ctx.cfg
        B, S, H, D = q.shape
        N = comp_kv.shape[1] if comp_kv is not None else 0
        do = torch.zeros_like(o) if do is None else do.contiguous()
        delta = (do.float() * o.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        delta = delta.contiguous()
        dsinks = -(torch.exp(sinks.float().view(1, 1, H) - lse) * delta).sum((0, 1)).to(sinks.dtype)
        cfg = _config(H, D, q.dtype, comp)
        dq = new_empty(q.shape, device=q.device, dtype=q.dtype)
        ck = comp_kv if comp_kv is not None else kv
        dck32 = torch.zeros(B, N, D, device=q.device, dtype=torch.float32) if comp == 2 else lse
        ksel = idx.shape[2] if idx is not None else 0
        idx_ = idx if idx is not None else seg
        _attn_bwd_dq_kernel[(B * S, triton.cdiv(H, cfg["BHQ"]))](
            q,
            kv,
            ck,
            seg,
            lo,
            hi,
            idx_,
            do,
            lse,
            delta,
            dq,
            dck32,
            S,
            H,
            N,
            ksel,
            scale * LOG2E,
            scale,
            window,
            D=D,
            DP=triton.next_power_of_2(D),
            BH=cfg["BHQ"],
            BN=cfg["BNQ"],
            COMP=comp,
            UPCAST=_interp(),
            PREC=_prec(q),
            num_warps=cfg["warps_q"],
            num_stages=cfg["stages_q"],
        )
        dkv = _dkv(q, kv, seg, lo, hi, do, lse, delta, window, scale, 0, cfg).to(kv.dtype)
        dck = None
        if comp == 1:
            dck = _dkv(q, comp_kv, seg, lo, hi, do, lse, delta, window, scale, 1, cfg).to(comp_kv.dtype)
        elif comp == 2:
            dck = dck32.to(comp_kv.dtype)
        elif comp_kv is not None:
            dck = torch.zeros_like(comp_kv)
        return dq, dkv, dsinks, dck, None, None, None, None, None, None, None


def hybrid_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    window: int,
    seg_start: Optional[torch.Tensor] = None,
    comp_kv: Optional[torch.Tensor] = None,
    comp_lo: Optional[torch.Tensor] = None,
    comp_hi: Optional[torch.Tensor] = None,
    comp_idx: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton hybrid attention; same contract as ``ops.sparse_attention.hybrid_attention`` -> (o, lse)."""
    if (
        q.dim() != 4
        or kv.dim() != 3
        or q.dtype == torch.float64
        or not native(q)
        or tuple(kv.shape) != (q.shape[0], q.shape[1], q.shape[3])
        or tuple(sinks.shape) != (q.shape[2],)
    ):
        return _ref.hybrid_attention(q, kv, sinks, scale, window, seg_start, comp_kv, comp_lo, comp_hi, comp_idx)
    B, S, H, D = q.shape
    dev = q.device
    has_comp = comp_kv is not None and comp_kv.shape[1] > 0
    if has_comp and comp_idx is None and (comp_lo is None or comp_hi is None):
        raise ValueError("compressed entries need either comp_idx or both comp_lo and comp_hi")
    comp = 0 if not has_comp else (2 if comp_idx is not None else 1)
    seg = seg_start if seg_start is not None else torch.zeros(B, S, device=dev, dtype=torch.long)
    seg = seg.to(torch.int32).contiguous()
    lo = comp_lo.to(torch.int32).contiguous() if comp == 1 else seg
    hi = comp_hi.to(torch.int32).contiguous() if comp == 1 else seg
    idx = comp_idx.to(torch.int32).contiguous() if comp == 2 else None
    window = int(max(1, min(int(window), S)))
    if _config(H, D, q.dtype, comp) is None:  # no tiling fits shared memory (e.g. fp32 at D ≥ 1024)
        return _ref.hybrid_attention(q, kv, sinks, scale, window, seg_start, comp_kv, comp_lo, comp_hi, comp_idx)
    return _HybridAttention.apply(
        q.contiguous(),
        kv.contiguous(),
        sinks.contiguous(),
        comp_kv.contiguous() if has_comp else None,
        float(scale),
        window,
        seg,
        lo,
        hi,
        idx,
        comp,
    )


def attention_flops(B: int, S: int, H: int, D: int, entries_per_query: float, with_backward: bool = False) -> float:
    """Matmul flops counting only attended entries: 4·D per (query, head, entry) forward (QKᵀ and PV); the
    backward adds 2.5× that (QKᵀ recompute, dO·Kᵀ, dQ, dK, dV), so forward+backward = 3.5×."""
    f = 4.0 * B * S * H * D * entries_per_query
    return f * 3.5 if with_backward else f


__all__ = ["hybrid_attention", "attention_flops"]
