"""RMSNorm over the last dim, weighted or not (docs/MODEL.md §11), as one op with a hand-written backward.

    r = 1/sqrt(mean(x²) + eps),   x̂ = x·r,   y = w ⊙ x̂   (w = 1: the per-head query norm)
    ∂x = r·(ĝ − x̂·mean(ĝ ⊙ x̂)),  ĝ = w ⊙ ∂y,     ∂w = Σ_rows ∂y ⊙ x̂

Backends (``ops.dispatch`` name ``rms_norm``):

* ``reference``: the formula in PyTorch ops, differentiated by autograd (statistics in fp32; the weighted form
  multiplies by the fp32 weight before the single cast back, the unweighted one multiplies x by the factor
  cast to x's dtype — both as HF does).
* ``blocked``: the same forward in fewer passes, saving only (x, w, r); the backward above instead of
  autograd's chain of elementwise nodes (about half the passes over [T, d]; the per-head query norm of the
  `small` config is a [T, 8, 512] tensor per layer).

Correctness: ``tests/test_ops_blocked_misc.py`` (fp32 against the reference, float64 gradcheck).
"""

from __future__ import annotations

from typing import Optional

import torch

from ops.dispatch import register

__all__ = ["rms_norm", "rms_norm_fused"]


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """``weight ⊙ x / sqrt(mean(x²) + eps)`` over the last dim (``weight=None``: unweighted) (reference)."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    if weight is None:
        return x * torch.rsqrt(x.to(cdt).square().mean(-1, keepdim=True) + eps).to(x.dtype)
    xc = x.to(cdt)
    y = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    return (weight.to(cdt) * y).to(x.dtype)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        cdt = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(cdt)
        r = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
        if weight is None:
            y = x * r.to(x.dtype)
        else:
            y = (xc * r).mul_(weight.to(cdt)).to(x.dtype)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        cdt = r.dtype
        xhat = x.to(cdt) * r
        gc = g.to(cdt)
        dw = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (gc * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        gw = gc if weight is None else gc * weight.to(cdt)
        dot = (gw * xhat).mean(-1, keepdim=True)
        dx = (gw - xhat.mul_(dot)).mul_(r).to(x.dtype)
        return dx, dw, None


def rms_norm_fused(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Drop-in for :func:`rms_norm` (same forward up to rounding of the multiply order; hand-written backward)."""
    if weight is not None and weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be [{x.shape[-1]}] (the last dim of x)")
    if not torch.is_grad_enabled() or not (x.requires_grad or (weight is not None and weight.requires_grad)):
        return rms_norm(x, weight, eps)
    return _RMSNormFn.apply(x, weight, eps)


register("rms_norm", reference=rms_norm, blocked=rms_norm_fused)
