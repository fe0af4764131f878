"""KV-compressor pooling (CSA overlapping / HCA) as Triton kernels; reference ``ops.compressor.compressor_pool``.

Per entry n (block of m tokens starting at bs = block_start[n]; bs < 0 = unused slot → 0) and channel ch,
a softmax over the entry's slots j (docs/MODEL.md §5.1/§5.2):

    HCA (C = c):   slots j < m:   token bs + j,      value kv[·, ch],      logit gate[·, ch] + B[j, ch]
    CSA (C = 2c):  slots j < m:   token bs − m + j,  value kv[·, ch],      logit gate[·, ch] + B[j, ch]
                                  (only if prev_valid[n]; else logit −∞, value 0)
                   slots m ≤ j:   token bs + j − m,  value kv[·, c + ch],  logit gate[·, c + ch] + B[j−m, c + ch]
    w = softmax_j(logit) (fp32, cast to kv.dtype as the reference does),  y[n, ch] = Σ_j w_j v_j

Backward (per channel; g = ∂y, the cast of w is treated as identity like autograd does):
    ∂v_j = w_j g,   ∂logit_j = w_j (g v_j − y),   ∂gate = ∂logit at the same (token, channel),
    ∂B[j, ·] = Σ_n ∂logit_j (per-entry fp32 partials summed in a fixed order: deterministic).
Each (token, channel) of kv/gate belongs to at most one slot of one entry, so ∂kv/∂gate are plain stores
into zero-initialised buffers (no atomics). One program per (entry, BC channels); the slot axis (2m = 8 or
m' = 128) is held whole in registers.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ops import compressor as _ref
from ops.triton import native, new_empty


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _slots(bs_ptr, pv_ptr, e, S, c, offs_j, offs_c, M: tl.constexpr, OVERLAP: tl.constexpr):
    """Token, channel offset, bias row/col offsets and validity of the [J, BC] slot tile of entry e."""
    bs = tl.load(bs_ptr + e)
    if OVERLAP:
        pv = tl.load(pv_ptr + e) != 0
        is_prev = offs_j < M
        tok = tl.where(is_prev, bs - M + offs_j, bs + offs_j - M)
        choff = tl.where(is_prev, 0, c)
        brow = tl.where(is_prev, offs_j, offs_j - M)
        rvalid = (offs_j < 2 * M) & ((~is_prev) | pv) & (bs >= 0)
    else:
        tok = bs + offs_j
        choff = offs_j * 0
        brow = offs_j
        rvalid = (offs_j < M) & (bs >= 0)
    tok = tl.minimum(tl.maximum(tok, 0), S - 1)
    cmask = offs_c < c
    valid = rvalid[:, None] & cmask[None, :]
    return bs, tok, choff, brow, valid


@triton.jit
def _pool_fwd_kernel(
    kv_ptr,
    gate_ptr,
    bias_ptr,
    bs_ptr,
    pv_ptr,
    y_ptr,
    S,
    C,
    c,
    NE,
    M: tl.constexpr,
    J: tl.constexpr,
    OVERLAP: tl.constexpr,
    BC: tl.constexpr,
):
    e = tl.program_id(0)  # b * NE + n
    pc = tl.program_id(1)
    b = e // NE
    offs_j = tl.arange(0, J)
    offs_c = pc * BC + tl.arange(0, BC)
    bs, tok, choff, brow, valid = _slots(bs_ptr, pv_ptr, e, S, c, offs_j, offs_c, M, OVERLAP)
    ch = choff[:, None] + offs_c[None, :]
    src = (b.to(tl.int64) * S + tok[:, None]) * C + ch
    z = tl.load(gate_ptr + src, mask=valid, other=0.0).to(tl.float32) + tl.load(
        bias_ptr + brow[:, None] * C + ch, mask=valid, other=0.0
    ).to(tl.float32)
    z = tl.where(valid, z, float("-inf"))
    mx = tl.max(z, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    p = tl.where(valid, tl.exp(z - mx[None, :]), 0.0)
    den = tl.sum(p, axis=0)
    w = p / tl.where(den > 0, den, 1.0)[None, :]
    w = w.to(kv_ptr.dtype.element_ty).to(tl.float32)
    v = tl.load(kv_ptr + src, mask=valid, other=0.0).to(tl.float32)
    y = tl.sum(w * v, axis=0)
    y = tl.where(bs >= 0, y, 0.0)
    tl.store(y_ptr + e.to(tl.int64) * c + offs_c, y.to(y_ptr.dtype.element_ty), mask=offs_c < c)


@triton.jit
def _pool_bwd_kernel(
    kv_ptr,
    gate_ptr,
    bias_ptr,
    bs_ptr,
    pv_ptr,
    g_ptr,
    dkv_ptr,
    dgate_ptr,
    dbias_part_ptr,
    S,
    C,
    c,
    NE,
    M: tl.constexpr,
    J: tl.constexpr,
    OVERLAP: tl.constexpr,
    BC: tl.constexpr,
):
    e = tl.program_id(0)
    pc = tl.program_id(1)
    b = e // NE
    offs_j = tl.arange(0, J)
    offs_c = pc * BC + tl.arange(0, BC)
    bs, tok, choff, brow, valid = _slots(bs_ptr, pv_ptr, e, S, c, offs_j, offs_c, M, OVERLAP)
    ch = choff[:, None] + offs_c[None, :]
    src = (b.to(tl.int64) * S + tok[:, None]) * C + ch
    z = tl.load(gate_ptr + src, mask=valid, other=0.0).to(tl.float32) + tl.load(
        bias_ptr + brow[:, None] * C + ch, mask=valid, other=0.0
    ).to(tl.float32)
    z = tl.where(valid, z, float("-inf"))
    mx = tl.max(z, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    p = tl.where(valid, tl.exp(z - mx[None, :]), 0.0)
    den = tl.sum(p, axis=0)
    w = p / tl.where(den > 0, den, 1.0)[None, :]
    v = tl.load(kv_ptr + src, mask=valid, other=0.0).to(tl.float32)
    wq = w.to(kv_ptr.dtype.element_ty).to(tl.float32)
    g = tl.load(g_ptr + e.to(tl.int64) * c + offs_c, mask=offs_c < c, other=0.0).to(tl.float32)
    gv = g[None, :] * v  # ∂w_j (through the identity cast)
    dz = w * (gv - tl.sum(w * gv, axis=0)[None, :])
    dz = tl.where(valid, dz, 0.0)
    tl.store(dkv_ptr + src, (wq * g[None, :]).to(dkv_ptr.dtype.element_ty), mask=valid)
    tl.store(dgate_ptr + src, dz.to(dgate_ptr.dtype.element_ty), mask=valid)
    tl.store(
        dbias_part_ptr + (e.to(tl.int64) * M + brow[:, None]) * C + ch,
        dz,
        mask=(offs_j < (2 * M if OVERLAP else M))[:, None] & (offs_c < c)[None, :],
    )


def _cfg(c: int, J: int) -> int:
    if _interp():
        return min(16, triton.next_power_of_2(c))
    return max(16, min(triton.next_power_of_2(c), 8192 // J, 256))


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, gate, bias, bs, pv, overlap):
        B, S, C = kv.shape
        m = bias.shape[0]
        c = C // 2 if overlap else C
        NE = bs.shape[1]
        J = triton.next_power_of_2(2 * m if overlap else m)
        bc = _cfg(c, J)
        y = new_empty((B, NE, c), device=kv.device, dtype=kv.dtype)
        if B * NE > 0:
            _pool_fwd_kernel[(B * NE, triton.cdiv(c, bc))](
                kv, gate, bias, bs, pv, y, S, C, c, NE, M=m, J=J, OVERLAP=overlap, BC=bc
            )
        ctx.save_for_backward(kv, gate, bias, bs, pv)
        ctx.overlap = overlap
        return y

    @staticmethod
    def backward(ctx, g):
        kv, gate, bias, bs, pv = ctx.saved_tensors
        overlap = ctx.overlap
        B, S, C = kv.shape
        m = bias.shape[0]
        c = C // 2 if overlap else C
        NE = bs.shape[1]
        J = triton.next_power_of_2(2 * m if overlap else m)
        bc = _cfg(c, J)
        dkv = torch.zeros_like(kv)
        dgate = torch.zeros_like(gate)
        # every (slot row, channel) a valid program owns is written; unused slots / invalid prev rows stay 0
        part = torch.zeros(B * NE, m, C, device=kv.device, dtype=torch.float32)
        if B * NE > 0:
            _pool_bwd_kernel[(B * NE, triton.cdiv(c, bc))](
                kv, gate, bias, bs, pv, g.contiguous(), dkv, dgate, part, S, C, c, NE, M=m, J=J, OVERLAP=overlap, BC=bc
            )
        return dkv, dgate, part.sum(0).to(bias.dtype), None, None, None


def compressor_pool(
    kv: torch.Tensor,
    gate: torch.Tensor,
    position_bias: torch.Tensor,
    block_start: torch.Tensor,
    prev_valid: Optional[torch.Tensor],
) -> torch.Tensor:
    """Triton compressor pooling; same contract as ``ops.compressor.compressor_pool`` -> [B, N, c]."""
    ok = (
        kv.dim() == 3
        and gate.shape == kv.shape
        and position_bias.dim() == 2
        and position_bias.shape[1] == kv.shape[2]
        and block_start.dim() == 2
        and block_start.shape[0] == kv.shape[0]
        and kv.dtype != torch.float64
        and native(kv)
        and (prev_valid is None or kv.shape[2] % 2 == 0)
    )
    if not ok:
        return _ref.compressor_pool(kv, gate, position_bias, block_start, prev_valid)
    overlap = prev_valid is not None
    bs = block_start.to(torch.int32).contiguous()
    pv = (prev_valid.to(torch.int32) if overlap else bs).contiguous()
    return _Pool.apply(kv.contiguous(), gate.contiguous(), position_bias.contiguous(), bs, pv, overlap)
