"""Output head and cross-entropy in one op: the summed token loss without materialising [T, V] logits.

    z_t = h_t Wᵀ,    ℓ = Σ_{t: y_t ≠ ignore} (log Σ_v e^{z_{t,v}} − z_{t,y_t})
    ∂ℓ/∂z_t = softmax(z_t) − onehot(y_t)  (0 for ignored tokens),   ∂h_t = (∂ℓ/∂z_t) W,   ∂W = Σ_t (∂ℓ/∂z_t)ᵀ h_t

Backends (``ops.dispatch`` name ``linear_cross_entropy``):

* ``reference``: ``F.linear`` then ``F.cross_entropy`` on the fp32 logits — what the model did before, and
  what defines correctness.
* ``blocked``: token chunk by token chunk; each chunk's logits (at most ``CHUNK_ELEMENTS`` values) give its
  loss and, when a gradient is wanted, its ∂h rows and its share of ∂W right away (the loss is a sum, so the
  backward only scales the saved gradients by the incoming scalar). The [T, V] logits, their fp32 copy and
  the saved log-softmax (3 × 0.5 GiB for 4K tokens at V = 32K; 6 GiB at V = 129K) are never held.
  Products run in the input dtype like the reference's (bf16 in bf16), chunk results accumulate in fp32.

Only for an unsharded vocabulary (TP = 1); the model keeps megatron's vocab-parallel loss under TP.
Correctness: ``tests/test_ops_blocked_misc.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.dispatch import chunk_rows, register

__all__ = ["linear_cross_entropy", "blocked_linear_cross_entropy", "CHUNK_ELEMENTS"]

IGNORE_INDEX = -100
# logits per chunk; on CPU 128 MiB (1024 rows at V = 32K): smaller chunks make the ∂W accumulation (inner dim =
# chunk rows) memory-bound — measured at T = 4096, d = 1024, V = 32000, one core: 2^22 8.4 s, 2^24 6.8 s,
# 2^25 6.5 s, the unchunked reference 6.9 s for loss + backward
CHUNK_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 28}


def _check(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    if h.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"linear_cross_entropy: expected h [T, d], weight [V, d], labels [T]; got "
            f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if h.shape[1] != weight.shape[1] or labels.shape[0] != h.shape[0]:
        raise ValueError(
            f"linear_cross_entropy: shapes disagree: h {tuple(h.shape)}, weight "
            f"{tuple(weight.shape)}, labels {tuple(labels.shape)}"
        )


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Σ over tokens with ``labels != ignore_index`` of −log softmax(h Wᵀ)[label], fp32 scalar (float64 for
    float64 inputs) (reference).

    Args:
        h: [T, d] hidden states; weight: [V, d] output head; labels: int64 [T].
    """
    _check(h, weight, labels)
    cdt = torch.promote_types(h.dtype, torch.float32)
    return F.cross_entropy(F.linear(h, weight).to(cdt), labels, ignore_index=ignore_index, reduction="sum")


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index, want_grad):
        T, V = h.shape[0], weight.shape[0]
        rows = chunk_rows(CHUNK_ELEMENTS, V, h.device)
        cdt = torch.promote_types(h.dtype, torch.float32)
        loss = torch.zeros((), dtype=cdt, device=h.device)
        dh = torch.empty(h.shape, dtype=cdt, device=h.device) if want_grad else None
        dw = None
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            y = labels[t0:t1]
            valid = y != ignore_index
            safe = torch.where(valid, y, torch.zeros_like(y))
            # log-softmax in one fused pass (torch.logsumexp is several unfused passes over [C, V] on CPU)
            logp = torch.log_softmax(F.linear(h[t0:t1], weight).to(cdt), dim=-1)  # [C, V]
            picked = logp.gather(1, safe[:, None]).squeeze(1)
            loss -= torch.where(valid, picked, torch.zeros_like(picked)).sum()
            if want_grad:
                g = logp.exp_()  # softmax, in place
                g.scatter_add_(1, safe[:, None], torch.full_like(picked, -1.0)[:, None])
                g.mul_(valid[:, None])
                g = g.to(h.dtype)
                dh[t0:t1] = g @ weight
                if dw is None:  # the first chunk writes ∂W (no zero-filled [V, d] buffer)
                    dw = (g.t() @ h[t0:t1]).to(cdt)
                elif g.dtype == cdt:
                    dw.addmm_(g.t(), h[t0:t1])  # in place: no [V, d] temporary per chunk
                else:
                    dw += g.t() @ h[t0:t1]
        if want_grad and dw is None:  # no tokens
            dw = torch.zeros(weight.shape, dtype=cdt, device=h.device)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        dh, dw = ctx.saved_tensors
        if dh is None:
            raise RuntimeError(
                "linear_cross_entropy (blocked) was called without a gradient (no_grad or inputs "
                "without requires_grad) and cannot be differentiated afterwards"
            )
        return (dh * g_loss).to(ctx.dtypes[0]), (dw * g_loss).to(ctx.dtypes[1]), None, None, None


def blocked_linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Drop-in for :func:`linear_cross_entropy` (same arguments and result up to summation order); evaluated
    chunk by chunk as the module docstring says."""
    _check(h, weight, labels)
    want_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _ChunkedLinearCE.apply(h, weight, labels, ignore_index, want_grad)


register("linear_cross_entropy", reference=linear_cross_entropy, blocked=blocked_linear_cross_entropy)
