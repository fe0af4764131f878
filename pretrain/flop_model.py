"""FLOP model of one DeepSeek-V4 training step, per layer type, with the quadratic terms counted exactly.

A multiply-add is 2 FLOPs. For one sequence of S tokens (one document; query t at position t = 0..S-1), the
per-token counts of the forward pass are, with d hidden, c head dim, h heads, d_c query latent, g output groups
of width d_g, n mHC streams, m / m' the CSA / HCA rates, n_I / c_I / k the indexer heads, dim and top-k:

    linear (every layer)  2·[d·d_c + d_c·h·c + d·c + h·c·d_g + g·d_g·d]             attention projections
                          + 2·d·w                   (w = 2·2c CSA, 2c HCA: compressor kv and gate)
                          + 2·[d·4c_I + d_c·n_I·c_I + d·n_I]   (CSA: indexer compressor, query, weights)
                          + 2·[d·E + K_r·3·d·I + n_s·3·d·I]        router, routed and shared experts (SwiGLU)
                          + 2·2·[n·d·(2n + n²) + n·d + n²·d + n·d]                   mHC (2 sites)
    head                  2·d·V (+ the MTP block and head, counted as one more sliding layer and head)

The quadratic terms are sums over the queries of the entries each one touches (exact, closed form):

    window     Σ_t min(t + 1, W)                         4·h·c per key (q·k and p·v)
    compressed Σ_t E_t,  E_t = floor((t + 1)/m')  (HCA), min(k, floor((t + 1)/m)) (CSA sparse),
               floor((t + 1)/m) (CSA dense / indexer warm-up)                    4·h·c per entry
    indexer    Σ_t floor((t + 1)/m) visible entries scored for the top-k: 2·n_I·(c_I + 1) per entry
    KL target  Σ_t |E_t| (the selected k, or all visible in warm-up): mass 2·h·c and scores 2·n_I·(c_I + 1)

Backward = 2 × forward for every matmul, except where the implementation recomputes (counted as executed):
the blocked/flash attention recomputes q·k in its backward (forward 2 units, backward 5: total 3.5 × forward),
the top-k selection has no backward, and the streamed KL recomputes scores and mass (scores 1 + 3, mass 1 + 1).
``model.recompute=full`` runs every block's forward once more except the top-k selection (memoized from the
first forward, ``pretrain.model.recompute.memoized``), ``selective`` the attention core's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["StepFlops", "step_flops", "visible_sum", "window_sum"]


def visible_sum(S: int, m: int, cap: int | None = None) -> int:
    """Σ_{t=0}^{S-1} min(cap, floor((t + 1)/m)) (cap None = no cap): entries seen by all queries of a sequence."""

    def F(U: int) -> int:  # Σ_{u=1}^{U} floor(u / m)
        if U <= 0:
            return 0
        q, r = divmod(U, m)
        return m * q * (q - 1) // 2 + q * (r + 1)

    if cap is None:
        return F(S)
    edge = cap * m - 1  # floor(u/m) < cap  <=>  u <= cap·m - 1
    return F(min(S, edge)) + cap * max(0, S - edge)


def window_sum(S: int, W: int) -> int:
    """Σ_{t=0}^{S-1} min(t + 1, W): keys of the sliding windows of all queries."""
    if S <= W:
        return S * (S + 1) // 2
    return W * (W + 1) // 2 + (S - W) * W


@dataclass
class StepFlops:
    """FLOPs of one training step of ``tokens`` tokens, split by term (forward + backward, as executed)."""

    tokens: int
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def quadratic(self) -> float:
        return sum(v for k, v in self.terms.items() if k.startswith(("window", "compressed", "indexer")))

    def per_token(self) -> float:
        return self.total / max(1, self.tokens)


def _linear_per_token(cfg: Any, layer_type: str) -> float:
    d, c, h, dc = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.q_lora_rank
    n = cfg.hc_mult
    f = d * dc + dc * h * c + d * c + h * c * cfg.o_lora_rank + cfg.o_groups * cfg.o_lora_rank * d
    f += {"csa": d * 4 * c, "hca": d * 2 * c, "sliding": 0}[layer_type]
    if layer_type == "csa":
        f += d * 4 * cfg.index_head_dim + dc * cfg.index_n_heads * cfg.index_head_dim + d * cfg.index_n_heads
    inter = cfg.moe_intermediate_size
    f += d * cfg.n_routed_experts + cfg.num_experts_per_tok * 3 * d * inter + cfg.n_shared_experts * 3 * d * inter
    f += 2 * (n * d * (2 * n + n * n) + n * d + n * n * d + n * d)
    return 2.0 * f


def step_flops(
    cfg: Any, seq_len: int, batch: int = 1, attention_mode: str | None = None, recompute: str | None = None
) -> StepFlops:
    """FLOPs of one forward + backward over ``batch`` sequences of ``seq_len`` tokens (see the module docstring).

    ``cfg``: a ``ModelConfig``; ``attention_mode`` / ``recompute`` default to the config's."""
    mode = attention_mode or cfg.attention_mode
    rec = recompute or getattr(cfg, "recompute", "none")
    S = seq_len
    h, c = cfg.num_heads, cfg.head_dim
    ni, ci = cfg.index_n_heads, cfg.index_head_dim
    layers = list(cfg.layer_types) + [cfg.mtp_layer_type] * cfg.num_mtp_layers
    out = StepFlops(tokens=S * batch)
    t = out.terms

    def add(key: str, fwd: float, total_factor: float, core: bool = False, block: bool = True) -> None:
        again = 1.0 if ((rec == "full" and block) or (rec == "selective" and core)) else 0.0
        t[key] = t.get(key, 0.0) + batch * fwd * (total_factor + again)

    win = window_sum(S, cfg.sliding_window)
    for lt in layers:
        add("linear", S * _linear_per_token(cfg, lt), 3.0)
        add("window attention", 4.0 * h * c * win, 3.5, core=True)
        if lt == "hca":
            add("compressed attention (HCA)", 4.0 * h * c * visible_sum(S, cfg.compress_rate_hca), 3.5, core=True)
        elif lt == "csa":
            m = cfg.compress_rate_csa
            vis = visible_sum(S, m)
            ent = visible_sum(S, m, cfg.index_topk) if mode == "sparse" else vis
            add("compressed attention (CSA)", 4.0 * h * c * ent, 3.5, core=True)
            if mode != "dense":
                score = 2.0 * ni * (ci + 1)
                if mode == "sparse":
                    add("indexer scores (top-k)", score * vis, 1.0, block=False)  # memoized: not recomputed
                # KL: scores (forward + recompute + 2 backward products) and the mass (forward + recompute)
                add("indexer KL", score * ent, 4.0)
                add("indexer KL", 2.0 * h * c * ent, 2.0)
    add("head", S * 2.0 * cfg.hidden_size * cfg.vocab_size * (1 + cfg.num_mtp_layers), 3.0, block=False)
    return out
