"""DeepSeekMoE as in V4 (docs/MODEL.md §9; paper §2.1), built on megatron-core's ``MoELayer``.

    y = Σ_{e ∈ sel(x)} g_e · E_e(x) + E_shared(x)
    E(x) = W2( silu(min(W1 x, c)) ⊙ clamp(W3 x, −c, c) )          (clamped SwiGLU, c = swiglu_limit = 10)
    s = sqrt(softplus(x W_gᵀ))                                    (router affinities, fp32)
    sel(x) = TopK_{K_r}(s + b)   (learned layers; b = aux-loss-free bias, affects the selection only)
    sel(x) = tid2eid[token_id]   (hash layers: the first ``n_hash_layers`` layers; no bias)
    g_e = routed_scaling_factor · s_e / Σ_{e' ∈ sel} s_e'

What megatron-core 0.19.2 provides and we use unchanged (semantics checked against its source):
* ``TopKRouter`` with ``moe_router_score_function="sqrtsoftplus"``: ``softplus(l).sqrt()``, top-k over
  ``scores + expert_bias`` when ``moe_router_enable_expert_bias``, gates gathered from the unbiased scores,
  normalised by their sum (+1e-20), × ``moe_router_topk_scaling_factor`` — exactly the V4 gate.
* ``activation_func_clamp_value``: in the non-fused GLU path ``x_glu.clamp(max=c)``, ``x_linear.clamp(-c, c)``,
  ``silu(x_glu) * x_linear`` with fc1 = [gate; up] — exactly V4's clamped SwiGLU, for the routed experts
  (``SequentialMLP`` of ``MLP``) and the shared expert (``SharedExpertMLP`` with ``gate=False``: no sigmoid gate).
* The alltoall token dispatcher (expert parallelism) and the expert-bias update rule
  ``b ← b + γ·sign(mean_load − load)`` (``moe_utils.get_updated_expert_bias``), fed by the router's
  ``local_tokens_per_expert`` counter.

What we add:
* :class:`HashRouter`: routing from the fixed table ``tid2eid [vocab, K_r]`` (:func:`make_hash_table`).
* :class:`BalancedTopKRouter`: megatron's router plus the V4 sequence-wise balance loss returned as a value
  (``balance_loss``) instead of megatron's hidden gradient injection, and the per-step expert loads.
  L_bal = α Σ_i f_i P_i per sequence, f_i = N_r/(K_r T) Σ_t 1[i ∈ TopK_t(s)], P_i = (1/T) Σ_t s_{i,t}/Σ_j s_{j,t},
  averaged over the sequences of the micro-batch (computed with megatron's ``switch_load_balancing_loss_func``).
  Hash layers have no balance loss: their selection is fixed, so only f_i·P_i's P term could move (paper UNKNOWN).

Tensor parallelism: megatron's MoELayer under TP expects its input split along the sequence over the TP ranks
(``sequence_parallel``; the shared expert all-gathers / reduce-scatters, the router weight's gradient is summed
over TP by ``finalize_model_grads``, so the DDP config must have ``sequence_parallel=True``). The rest of the
model keeps replicated activations, so :class:`V4MoE` scatters x [S, B, d] along S on entry and all-gathers the
output (backward: split) — replicated in, replicated out, exact. The balance loss is then assembled from the
TP ranks' chunks: the per-(sequence, expert) counts f are all-reduced over TP, each rank's partial
α Σ f·P_local is summed over TP (forward all-reduce, backward identity), so every rank holds the full loss and
each its own tokens' gradient.

Expert-bias update: megatron applies it in ``finalize_model_grads`` (once per global batch, all-reduced over
TP×DP×CP) when ``moe_router_enable_expert_bias`` is set. A trainer that does not call ``finalize_model_grads``
(one process, no DDP) calls :func:`update_expert_bias` after ``optimizer.step()``; it applies the same rule to
every learned router and resets the counters.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    get_updated_expert_bias,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import Router, TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from parallel.process_groups import megatron_cpu_flags

log = logging.getLogger(__name__)


def make_hash_table(vocab_size: int, n_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """The token → experts table ``tid2eid`` [vocab, K_r] (int64) of the hash-routed layers.

    The paper's hash function is UNKNOWN (§9); ours is deterministic in ``seed`` and balanced:
    a deck of seeded random permutations of the N_r experts is dealt K_r at a time (each permutation serves
    ⌊N_r/K_r⌋ tokens, the E mod K_r leftovers are discarded), so every row holds K_r distinct experts and every
    expert is dealt (almost) equally often; the rows are then assigned to token ids by a seeded permutation of
    the vocabulary so that neighbouring ids do not share experts.
    """
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"make_hash_table: top_k={top_k} must be in [1, n_experts={n_experts}]")
    g = torch.Generator().manual_seed(int(seed))
    per_perm = n_experts // top_k
    n_perms = -(-vocab_size // per_perm)
    perms = torch.stack([torch.randperm(n_experts, generator=g, device="cpu") for _ in range(n_perms)])
    rows = perms[:, : per_perm * top_k].reshape(n_perms * per_perm, top_k)[:vocab_size]
    order = torch.randperm(vocab_size, generator=g, device="cpu")
    return rows[order].contiguous().long()


def megatron_moe_config(
    cfg: Any, params_dtype: torch.dtype = torch.float32, bias_update_rate: float = 1e-3, **overrides: Any
):
    """megatron ``TransformerConfig`` for the MoE layers of a V4 ``ModelConfig`` (current parallel state).

    The attention fields are placeholders required by TransformerConfig (our attention is our own module).
    """
    flags = megatron_cpu_flags() if not torch.cuda.is_available() else {}
    std = cfg.init_std
    kw = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.moe_intermediate_size,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        # TP > 1: megatron's MoE needs sequence-parallel chunks (see the module docstring); the head must not
        sequence_parallel=ps.get_tensor_model_parallel_world_size() > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        activation_func_clamp_value=cfg.swiglu_limit,
        glu_linear_offset=0.0,
        init_method=partial(nn.init.normal_, mean=0.0, std=std),
        output_layer_init_method=partial(nn.init.normal_, mean=0.0, std=std),
        num_moe_experts=cfg.n_routed_experts,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=(
            cfg.n_shared_experts * cfg.moe_intermediate_size if cfg.n_shared_experts else None
        ),
        moe_shared_expert_gate=False,
        moe_shared_expert_overlap=False,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_router_score_function="sqrtsoftplus",
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
        moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=bias_update_rate,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    for k, v in flags.items():
        if k in {f.name for f in dataclasses.fields(TransformerConfig)}:
            kw.setdefault(k, v)
    kw.update(overrides)
    return TransformerConfig(**kw)


class _LoadTracking:
    """Per-forward expert loads (tokens per expert on this rank) for logging."""

    tokens_per_expert: Optional[torch.Tensor] = None

    def _record_loads(self, routing_map: torch.Tensor) -> None:
        self.tokens_per_expert = routing_map.sum(dim=0).detach()


class HashRouter(_LoadTracking, Router):
    """Hash routing: sel(x_t) = tid2eid[token_id_t]; gates from the learned sqrt-softplus affinities.

    The token ids of the current micro-batch are set by :class:`V4MoE` (``token_ids``, [S·B] in the
    router's sequence-major token order) right before the layer runs. No expert bias, no balance loss.
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, vocab_size: int, hash_seed: int):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.topk = config.moe_router_topk
        self.register_buffer("tid2eid", make_hash_table(vocab_size, config.num_moe_experts, self.topk, hash_seed))
        self.token_ids: Optional[torch.Tensor] = None
        self.balance_loss: Optional[torch.Tensor] = None

    def routing(self, logits: torch.Tensor, padding_mask=None):
        if self.token_ids is None:
            raise RuntimeError("HashRouter: token ids were not set; call the layer through V4MoE(x, input_ids)")
        logits = logits.reshape(-1, self.config.num_moe_experts)
        if self.token_ids.numel() != logits.shape[0]:
            raise ValueError(f"HashRouter: {self.token_ids.numel()} token ids for {logits.shape[0]} tokens")
        indices = self.tid2eid[self.token_ids]
        probs, routing_map = topk_routing_with_score_function(
            logits,
            self.topk,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.config.moe_router_score_function,
            precomputed_indices=indices,
        )
        self._record_loads(routing_map)
        return probs, routing_map

    def forward(self, input: torch.Tensor, padding_mask=None):
        return self.routing(self.gating(input), padding_mask)


class BalancedTopKRouter(_LoadTracking, TopKRouter):
    """megatron's TopKRouter (sqrtsoftplus, expert bias, scaling) + V4's sequence-wise balance loss value."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, balance_loss_coeff: float = 0.0):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.balance_loss_coeff = balance_loss_coeff
        self.balance_loss: Optional[torch.Tensor] = None

    def routing(self, logits: torch.Tensor, padding_mask=None):
        seq_len, bsz = logits.shape[:2]
        probs, routing_map = super().routing(logits, padding_mask)
        self._record_loads(routing_map)
        self.balance_loss = None
        if self.balance_loss_coeff > 0 and self.training and torch.is_grad_enabled():
            flat = logits.reshape(-1, self.config.num_moe_experts)
            sel_map, scores = compute_routing_scores_for_aux_loss(flat, self.topk, self.score_function)
            e = self.config.num_moe_experts
            # [S·B, E] -> [S, B·E]: each (sequence, expert) pair becomes one "expert" of a switch loss over
            # the S tokens, so the sum over pairs is Σ_b Σ_i f_i^b P_i^b (megatron's seq_aux_loss trick).
            scores = scores.reshape(seq_len, bsz * e)
            counts = sel_map.reshape(seq_len, bsz * e).sum(dim=0).to(scores.dtype)
            tp = ps.get_tensor_model_parallel_world_size() if self.config.sequence_parallel else 1
            if tp > 1:  # sequence chunks on the TP ranks (module docstring): global f, partial P
                torch.distributed.all_reduce(counts, group=ps.get_tensor_model_parallel_group())
            from parallel import sequence_parallel as usp

            sp, _ = usp.sp_size_rank()
            if sp > 1:  # Ulysses shards too: f over the whole sequence; rank's P share × sp (mean = full)
                torch.distributed.all_reduce(counts, group=usp.sp_group())
            loss = (
                switch_load_balancing_loss_func(
                    scores, counts, seq_len * tp * sp, self.topk, e, self.balance_loss_coeff
                )
                / bsz
            )
            if tp > 1:
                from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

                loss = reduce_from_tensor_model_parallel_region(loss)
            self.balance_loss = loss * sp if sp > 1 else loss
        return probs, routing_map


def _tag_expert_params(layer: nn.Module, moe_inter: int, shared_inter: Optional[int], etp: int, tp: int) -> None:
    """docs/CONTRACTS.md attributes: fused fc1 [gate; up] blocks, expert flags."""
    for name, p in layer.named_parameters():
        if ".local_experts." in f".{name}":
            p.v4_expert = True
            if "linear_fc1" in name:
                p.v4_blocks = [moe_inter // etp, moe_inter // etp]
        elif name.startswith("shared_experts.") and "linear_fc1" in name and shared_inter:
            p.v4_blocks = [shared_inter // tp, shared_inter // tp]


class V4MoE(nn.Module):
    """One V4 MoE sub-layer: x [B, S, d], input_ids [B, S] -> [B, S, d].

    Wraps megatron's ``MoELayer`` (which works sequence-major, [S, B, d]). Attributes for logging:
    ``router.tokens_per_expert`` (this rank's loads of the last forward) and ``router.balance_loss``.
    """

    def __init__(
        self,
        cfg: Any,
        layer_number: int,
        is_hash: bool,
        config: Any,
        balance_loss_coeff: float = 0.0,
        is_mtp_layer: bool = False,
    ):
        super().__init__()
        self.is_hash = is_hash
        mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        router = (
            partial(HashRouter, vocab_size=cfg.vocab_size, hash_seed=cfg.hash_seed + layer_number)
            if is_hash
            else partial(BalancedTopKRouter, balance_loss_coeff=balance_loss_coeff)
        )
        submodules = MoESubmodules(
            experts=partial(SequentialMLP, submodules=mlp),
            shared_experts=partial(SharedExpertMLP, submodules=mlp) if cfg.n_shared_experts else None,
            router=router,
        )
        self.layer = MoELayer(config, submodules=submodules, layer_number=layer_number, is_mtp_layer=is_mtp_layer)
        self.layer.set_layer_number(layer_number)
        _tag_expert_params(
            self.layer,
            cfg.moe_intermediate_size,
            config.moe_shared_expert_intermediate_size,
            config.expert_tensor_parallel_size or 1,
            config.tensor_model_parallel_size,
        )

    @property
    def router(self) -> nn.Module:
        return self.layer.router

    def forward(self, x: torch.Tensor, input_ids: Optional[torch.Tensor]) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"V4MoE: x must be [B, S, d], got {tuple(x.shape)}")
        tp = ps.get_tensor_model_parallel_world_size() if self.layer.config.sequence_parallel else 1
        if tp > 1 and x.shape[1] % tp:
            raise ValueError(
                f"V4MoE: sequence length {x.shape[1]} must be divisible by the tensor-parallel "
                f"size {tp} (the MoE works on sequence chunks under TP)"
            )
        if self.is_hash:
            if input_ids is None or tuple(input_ids.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"V4MoE (hash layer): input_ids [B, S] = {tuple(x.shape[:2])} required, got "
                    f"{None if input_ids is None else tuple(input_ids.shape)}"
                )
            ids = input_ids.transpose(0, 1)
            if tp > 1:
                ids = ids.chunk(tp, dim=0)[ps.get_tensor_model_parallel_rank()]
            self.layer.router.token_ids = ids.reshape(-1)
        h = x.transpose(0, 1).contiguous()
        if tp > 1:
            from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

            h = scatter_to_sequence_parallel_region(h)
        try:
            out, _ = self.layer(h)
        finally:
            if self.is_hash:
                self.layer.router.token_ids = None
        if tp > 1:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        return out.transpose(0, 1)


def iter_routers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, router) for every MoE router of ``model`` (hash and learned)."""
    for name, m in model.named_modules():
        if isinstance(m, V4MoE):
            yield name, m.router


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float, group: Optional[torch.distributed.ProcessGroup] = None) -> None:
    """Aux-loss-free bias step for every learned router: b ← b + rate·sign(mean_load − load); resets counters.

    Same rule as megatron's ``finalize_model_grads`` (``get_updated_expert_bias``); the loads are the tokens
    counted since the last call, all-reduced over ``group`` (default: megatron's TP×DP×CP group).
    """
    for _, router in iter_routers(model):
        if getattr(router, "expert_bias", None) is None or not router.training:
            continue
        router.expert_bias.copy_(
            get_updated_expert_bias(router.local_tokens_per_expert, router.expert_bias, rate, tp_dp_cp_group=group)
        )
        router.local_tokens_per_expert.zero_()
