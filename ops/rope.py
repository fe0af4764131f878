"""Interleaved partial RoPE of DeepSeek-V4 (docs/MODEL.md §4.1, §4.4, §4.6, §11).

Every head of width ``D`` is laid out as ``[nope (D - r) | rope (r)]``; only the LAST ``r`` dims rotate.
The rotated dims are taken in interleaved (GPT-J style) pairs ``(2i, 2i+1)``, i = 0..r/2-1, with angle
``φ_i(p) = p · θ_i``::

    y_{2i}   = x_{2i} cos φ_i - x_{2i+1} sin φ_i
    y_{2i+1} = x_{2i+1} cos φ_i + x_{2i} sin φ_i

``θ_i = base^{-2i/r}``; for the CSA/HCA layers optionally blended by YaRN (no attention/mscale factor):
``low = floor(corr(β_fast))``, ``high = ceil(corr(β_slow))`` with ``corr(β) = r·ln(L_orig/(2πβ)) / (2 ln base)``
clipped to [0, r-1]; ``ramp_i = clamp((i - low)/(high - low), 0, 1)``; ``θ'_i = θ_i/s · ramp_i + θ_i · (1 - ramp_i)``.

The inverse rotation (``inverse=True``) is the rotation at position ``-p``; the attention output is de-rotated
with it at the query position so that each V=K entry contributes by relative distance (§4.4).

Ops registered in ``ops.dispatch``: ``apply_rope`` (reference; ``blocked``: :func:`apply_rope_inplace_copy`,
the same rotation written into one copy of ``x``, whose backward is the inverse rotation of the incoming
gradient's last ``r`` dims — no per-part slices, ``cat`` and zero-filled slice gradients over the full width).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ops.dispatch import register

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope", "apply_rope_inplace_copy"]


def rope_inv_freq(
    rope_dim: int,
    base: float,
    yarn_factor: Optional[float] = None,
    original_max_position: int = 65536,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> list[float]:
    """The ``rope_dim/2`` inverse frequencies θ_i (Python floats, computed in float64).

    ``yarn_factor=None`` (or <= 1 is NOT special-cased: pass None to disable) gives plain RoPE
    θ_i = base^{-2i/r}; otherwise the YaRN blend of the module docstring (matches HF's
    ``_compute_yarn_parameters`` with ``truncate=True``; ``attention_factor`` is 1 in V4).
    """
    if rope_dim % 2 or rope_dim <= 0:
        raise ValueError(f"rope_dim={rope_dim} must be a positive even number (pairs of dims rotate)")
    half = rope_dim // 2
    theta = [base ** (-(2.0 * i) / rope_dim) for i in range(half)]
    if yarn_factor is None:
        return theta

    def corr(rotations: float) -> float:
        return rope_dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    out = []
    for i, th in enumerate(theta):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(th / yarn_factor * ramp + th * (1.0 - ramp))
    return out


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: list[float] | torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of φ_i(p) = p · θ_i for integer ``positions`` [...]; returns two tensors [..., r/2].

    The angle is formed in float64 (fp32 angles lose ~|p|·6e-8 rad, 0.06 rad at p = 1M) and the
    result is cast to ``dtype``.
    """
    inv = torch.as_tensor(inv_freq, dtype=torch.float64, device=positions.device)
    ang = positions.to(torch.float64)[..., None] * inv
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last ``r = 2·cos.shape[-1]`` dims of ``x`` in interleaved pairs (reference).

    Args:
        x: [..., D] any float dtype; dims ``[D-r, D)`` rotate, dims ``[0, D-r)`` pass through unchanged.
        cos, sin: [..., r/2], broadcastable against ``x[..., :r/2]`` (e.g. x [B,S,H,D] with cos [B,S,1,r/2]).
        inverse: rotate by ``-φ`` (sin negated), the conjugate rotation used to de-rotate the output.
    Returns:
        Tensor like ``x`` (same dtype). The rotation is computed in float32 (float64 for float64 inputs),
        as HF does, then cast back.
    """
    half = cos.shape[-1]
    r = 2 * half
    if x.shape[-1] < r:
        raise ValueError(
            f"apply_rope: x has last dim {x.shape[-1]} < rope dims {r}; cos/sin must have rope_head_dim/2 entries"
        )
    cdt = torch.promote_types(x.dtype, torch.float32)
    nope, rope = x[..., :-r], x[..., -r:]
    pairs = rope.to(cdt).unflatten(-1, (half, 2))
    rot = torch.stack(_rotated_pairs(pairs[..., 0], pairs[..., 1], cos, sin, inverse), dim=-1)
    return torch.cat((nope, rot.flatten(-2).to(x.dtype)), dim=-1)


def _rotated_pairs(
    a: torch.Tensor, b: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_{2i}, y_{2i+1}) of the module doc for the pair (a, b) = (x_{2i}, x_{2i+1}), in a's dtype; sin negated
    for the inverse rotation."""
    c, s = cos.to(a.dtype), sin.to(a.dtype)
    if inverse:
        s = -s
    return a * c - b * s, b * c + a * s


def _rotate_tail_(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotate the last ``2·cos.shape[-1]`` dims of ``y`` in place (computed as in :func:`apply_rope`)."""
    half = cos.shape[-1]
    cdt = torch.promote_types(y.dtype, torch.float32)
    pairs = y[..., -2 * half :].unflatten(-1, (half, 2))
    # both computed before writing: a, b may be views of y
    new_a, new_b = _rotated_pairs(pairs[..., 0].to(cdt), pairs[..., 1].to(cdt), cos, sin, inverse)
    pairs[..., 0].copy_(new_a)
    pairs[..., 1].copy_(new_b)
    return y


class _RopeCopy(torch.autograd.Function):
    """y = x with its last r dims rotated by φ; dx = dy with its last r dims rotated by −φ (R(φ)ᵀ = R(−φ))."""

    @staticmethod
    def forward(ctx, x, cos, sin, inverse):
        ctx.save_for_backward(cos, sin)
        ctx.inverse = inverse
        return _rotate_tail_(x.clone(memory_format=torch.contiguous_format), cos, sin, inverse)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return (
            _rotate_tail_(g.clone(memory_format=torch.contiguous_format), cos, sin, not ctx.inverse),
            None,
            None,
            None,
        )


def apply_rope_inplace_copy(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """Drop-in for :func:`apply_rope` (same arguments and results; the ``blocked`` backend). cos/sin carry no
    gradient here (they are functions of integer positions); if they require one, the reference is used."""
    if x.shape[-1] < 2 * cos.shape[-1] or cos.requires_grad or sin.requires_grad:
        return apply_rope(x, cos, sin, inverse)  # (raises the reference's error on a short x)
    return _RopeCopy.apply(x, cos, sin, inverse)


register("apply_rope", reference=apply_rope, blocked=apply_rope_inplace_copy)
