"""Manifold-Constrained Hyper-Connections as modules (docs/MODEL.md §2, §3; paper §2.2).

The residual stream of every token is widened to n = ``hc_mult`` parallel streams X ∈ R^{n×d}:

* :func:`expand_streams`: X⁰[j] = e for every j (the embedding copied into all streams).
* :class:`HyperConnection`: one mHC site around a sub-layer F (attention or MoE),
      X_{l+1} = combᵀ X_l + post ⊗ F(pre · X_l)
  with pre = σ(α_pre·x̂W_pre + S_pre) + ε, post = 2σ(α_post·x̂W_post + S_post), comb = Sinkhorn(α_res·x̂W_res + S_res)
  and x̂ the unweighted RMSNorm of vec(X_l). The math is in ``ops.mhc`` (``ops.functional``: reference or Triton).
* :class:`HyperHead`: final collapse y = Σ_j (σ(α·x̂W_head + S_head)_j + ε) X[j].

Parameters (fp32, HF names): ``fn`` = [W_pre; W_post; W_res] ∈ [(2+n)n, nd], ``base`` = S ∈ [(2+n)n],
``scale`` = (α_pre, α_post, α_res) ∈ [3]; the head has ``hc_fn`` [n, nd], ``hc_base`` [n], ``hc_scale`` [1].

Initialisation (paper: "α initialised to small values", rest UNKNOWN, §3.4) — we follow Megatron-LM's DSv4 choice:
``fn`` Xavier-uniform, ``base`` 0, every α = ``hc_init_gating`` (0.01). At init this gives pre ≈ ½ + ε,
post ≈ 1 and comb ≈ uniform 1/n (the softmax of near-zero logits is already doubly stochastic), i.e. each
stream starts as mean(X) + F(·): a plain pre-norm residual replicated over the streams.

Optimizers (``parallel.optimizer_groups.OPTIMIZER_ROUTES``): ``fn`` → Muon (a dynamic projection matrix),
``base``/``scale`` → AdamW (the paper's "static biases and gating factors").
"""

from __future__ import annotations

import torch
from torch import nn

from ops import functional as op


def expand_streams(embedding: torch.Tensor, n: int) -> torch.Tensor:
    """[B, S, d] -> [B, S, n, d], every stream a copy of the embedding (§2 step 2)."""
    if embedding.dim() != 3:
        raise ValueError(f"expand_streams: embedding must be [B, S, d], got {tuple(embedding.shape)}")
    return embedding.unsqueeze(2).expand(-1, -1, n, -1).contiguous()


class HyperConnection(nn.Module):
    """One mHC site: :meth:`pre` collapses the streams for the sub-layer, :meth:`post` writes its output back."""

    def __init__(
        self,
        hidden_size: int,
        hc_mult: int,
        sinkhorn_iters: int,
        hc_eps: float,
        rms_eps: float,
        init_gating: float = 0.01,
    ):
        super().__init__()
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.sinkhorn_iters, self.hc_eps, self.rms_eps = sinkhorn_iters, hc_eps, rms_eps
        self.init_gating = init_gating
        rows = (2 + hc_mult) * hc_mult
        self.fn = nn.Parameter(torch.empty(rows, hc_mult * hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(rows, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.fn.device.type == "meta":
            return
        nn.init.xavier_uniform_(self.fn)
        nn.init.zeros_(self.base)
        nn.init.constant_(self.scale, self.init_gating)

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """X [B, S, n, d] -> (x_in [B, S, d], post [B, S, n], comb [B, S, n, n])."""
        b, s, n, d = x.shape
        flat = x.reshape(b * s, n, d)
        x_in, post, comb = op.mhc_pre(
            flat,
            fn=self.fn,
            base=self.base,
            scale=self.scale,
            rms_eps=self.rms_eps,
            hc_eps=self.hc_eps,
            iters=self.sinkhorn_iters,
        )
        return x_in.view(b, s, d), post.view(b, s, n), comb.view(b, s, n, n)

    def post(self, o: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """X_new[k] = post_k · o + Σ_j comb_{jk} X[j]; o [B, S, d], X [B, S, n, d] -> [B, S, n, d]."""
        b, s, n, d = x.shape
        flat = x.reshape(b * s, n, d)
        out = op.mhc_post(o.reshape(b * s, d), x=flat, post=post.reshape(b * s, n), comb=comb.reshape(b * s, n, n))
        return out.view(b, s, n, d)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, n={self.hc_mult}, sinkhorn_iters={self.sinkhorn_iters}"


class HyperHead(nn.Module):
    """Final collapse of the n streams into one hidden state (§3.3): [B, S, n, d] -> [B, S, d]."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, rms_eps: float, init_gating: float = 0.01):
        super().__init__()
        self.hidden_size, self.hc_mult, self.hc_eps, self.rms_eps = hidden_size, hc_mult, hc_eps, rms_eps
        self.init_gating = init_gating
        self.hc_fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size, dtype=torch.float32))
        self.hc_base = nn.Parameter(torch.empty(hc_mult, dtype=torch.float32))
        self.hc_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.hc_fn.device.type == "meta":
            return
        nn.init.xavier_uniform_(self.hc_fn)
        nn.init.zeros_(self.hc_base)
        nn.init.constant_(self.hc_scale, self.init_gating)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, n, d = x.shape
        flat = x.reshape(b * s, n, d)
        y = op.hc_head(
            flat, fn=self.hc_fn, base=self.hc_base, scale=self.hc_scale, rms_eps=self.rms_eps, hc_eps=self.hc_eps
        )
        return y.view(b, s, d)
