"""DeepSeek-V4 hybrid attention: sliding-window, CSA (compressed sparse) and HCA (heavily compressed) layers
(docs/MODEL.md §4–§7, §11, §12.4; paper §2.3).

For token t with attention input h_t (all layer types):

    c^Q_t = RMSNorm_q(h_t W^{DQ})                       q_a_proj, q_a_norm (weighted, d_c)
    q_t   = RoPE_t(RMSNorm(c^Q_t W^{UQ}))               q_b_proj; per-head UNWEIGHTED norm over c; RoPE last r dims
    kv_t  = RoPE_t(RMSNorm_kv(h_t W^{KV}))              kv_proj, kv_norm; one shared K=V head
    o_t   = Σ_{j∈W_t∪C_t} softmax-with-sink(q·k_j/√c) v_j  joint softmax, sink logit z'_h (``sinks``), §4.3
    o_t  ← RoPE_{-t}(o_t)                               de-rotation of the last r dims of each head, §4.4
    out_t = [o_{t,1..g} W_{a,r}ᵀ]_r W_bᵀ               o_a_proj (block-diagonal per group), o_b_proj, §4.5

W_t = the last ``sliding_window`` tokens (incl. t) of t's document. C_t depends on the layer type:
* "sliding": none; RoPE base ``rope_theta``, no YaRN.
* "hca": all visible entries of the non-overlapping compressor (rate m'); RoPE ``compress_rope_theta`` + YaRN.
* "csa": entries of the overlapping compressor (rate m) — all visible ones in ``attention_mode`` "dense" and
  "indexer_warmup", the lightning indexer's top-k (``index_topk``) in "sparse"; same RoPE as HCA.
Entry s is visible to t iff its block ends at or before t inside t's document (s < floor((t+1)/m) for a
single document).

Packed sequences: ``doc_ids`` [B, S] (segments = runs of equal ids). No attention across documents and no
compression across document boundaries (each document has its own block grid, ``ops.compressor``);
``position_ids`` default to positions that restart at 0 per document, so a document inside a pack gives
exactly the outputs it gives alone. ``doc_ids=None`` is one document per row (the plain spec).

Indexer training (§12.4), CSA only, ``attention_mode``:
* "dense": no indexer is run; ``indexer_loss`` is None.
* "indexer_warmup": dense attention for the LM; ``indexer_loss`` = KL(P‖Q) over all visible entries, P = the
  main attention's mass on each entry summed over heads and renormalised (a constant), Q = softmax of the
  index scores. (Freezing the LM during warm-up is the trainer's job.)
* "sparse": top-k attention; the KL is restricted to the selected entries.
The indexer always sees DETACHED h and c^Q, so ``indexer_loss`` reaches only indexer parameters; the model
multiplies it by ``indexer_loss_coeff``. ``attention_mode`` is a plain attribute the trainer may change.

Tensor parallelism (megatron-core): q_b_proj is a ColumnParallelLinear (heads split), o_a_proj holds the
local groups (``o_groups / tp`` blocks; weight tagged tensor_model_parallel, partition_dim 0), o_b_proj is a
RowParallelLinear, ``sinks`` are split with the heads. q_a_proj, kv_proj, the compressor and the indexer are
replicated; the replicated kv / compressed entries enter the head-parallel region through
``copy_to_tensor_model_parallel_region`` (gradient all-reduced), and the indexer's target mass is summed
over all heads from the all-gathered (detached) q and lse of every head. At tp = 1 all of this is the identity.

Ulysses sequence parallelism (``parallel.sequence_parallel``, sp > 1): x is this rank's shard [B, S/sp, d]
(tokens [r·S/sp, (r+1)·S/sp)); ``doc_ids`` / ``position_ids`` cover the WHOLE sequence [B, S]. There is one
forward for every sp: the math above once, with the exchanges as steps of a ``SequenceShard`` (each the identity
at sp = 1): the K=V head and the compressor input are all-gathered along the sequence (every rank sees the whole
causal prefix); the projections, RoPE and the indexer queries work on the local tokens; queries go head-parallel
through the Ulysses all-to-all (rank r attends heads [r·h/sp, (r+1)·h/sp) of all S queries, with those heads'
sinks) and o comes back; the indexer scores the local queries against all compressed keys (top-k over the full
sequence) and its selections are all-gathered; its KL target takes every head of the local queries (inverse
all-to-all of q and lse, O(S·h·c), no [S, N] mass exchanged) and the local KL mean is rescaled so that its mean
over the sp ranks is the one-process mean over all qualifying queries.

Long context: the indexer's top-k (op ``indexer_select``) and its KL loss with the target fused in (op
``indexer_attention_kl``) are streamed in query chunks and key blocks on the ``blocked`` backend, so no tensor
of size [S, S/m] exists (docs/LONG_CONTEXT.md); the reference ops materialise them and define the results.

Selective activation recomputation (``recompute_core``, set by the block for ``model.recompute=selective``;
:mod:`pretrain.model.recompute`): the region from c^Q to the de-rotated o (q_b_proj, the per-head norm, RoPE,
the hybrid attention, RoPE_{-t}; under Ulysses also the q / o all-to-alls) keeps only its inputs and is rerun
in the backward (:meth:`V4Attention._core_attention`).

HF names are used for every parameter, so an HF ``DeepseekV4Attention`` state dict copies in unchanged
(shapes equal at tp = 1; o_a_proj.weight is [g·d_g, n_h·c/g] as in HF). Megatron's linear layers add an
``_extra_state`` entry (None) per layer to ``state_dict()``; converters skip those keys.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ops import functional as op
from ops.compressor import compressed_layout, document_positions, segment_starts
from parallel.sequence_parallel import SequenceShard
from pretrain.model.compressor import KVCompressor
from pretrain.model.indexer import LightningIndexer
from pretrain.model.rmsnorm import RMSNorm, unweighted_rms_norm
from pretrain.model.rope import RotaryEmbedding

log = logging.getLogger(__name__)

__all__ = ["V4Attention", "GroupedOutputProjection", "megatron_parallel_config"]

LAYER_TYPES = ("sliding", "csa", "hca")
ATTENTION_MODES = ("dense", "indexer_warmup", "sparse")


def megatron_parallel_config(tp_size: int = 1, params_dtype: torch.dtype = torch.float32) -> Any:
    """A megatron ``ModelParallelConfig`` for the attention's parallel linears (CPU-safe flags).

    Weights are always initialised on the CPU (``use_cpu_initialization``): the master matrix is drawn from
    the default generator and sliced per TP rank, so every layout starts from the same weights and no
    megatron CUDA RNG tracker is needed; move the model to the GPU afterwards.
    """
    from megatron.core.model_parallel_config import ModelParallelConfig

    from parallel.process_groups import megatron_cpu_flags

    fields = ModelParallelConfig.__dataclass_fields__
    flags = {k: v for k, v in megatron_cpu_flags().items() if k in fields}
    flags.update(
        tensor_model_parallel_size=tp_size,
        params_dtype=params_dtype,
        perform_initialization=True,
        use_cpu_initialization=True,
    )
    return ModelParallelConfig(**flags)


def _resolve_tp_group(tp_group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    if tp_group is not None:
        return tp_group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None


class GroupedOutputProjection(nn.Module):
    """o_a_proj: per group r, o'_r = o_{t,r} W_{a,r}ᵀ with W_{a,r} ∈ [d_g, n_h·c/g] (block-diagonal).

    ``weight`` is [g_local·d_g, n_h·c/g] (HF's layout, viewed as [g_local, d_g, n_h·c/g]); with tensor
    parallelism each rank holds ``g/tp`` consecutive groups (rows of the full matrix), tagged
    ``tensor_model_parallel`` / ``partition_dim=0``, ``v4_blocks = [d_g] * g_local`` (each group is an
    independent matrix for Muon) and ``v4_tp_whole_blocks`` (the TP shard is whole groups, not a slice of
    every group as for a fused [gate; up]).
    """

    def __init__(
        self,
        in_per_group: int,
        out_per_group: int,
        n_groups: int,
        tp_size: int = 1,
        tp_rank: int = 0,
        init_std: float = 0.02,
    ):
        super().__init__()
        if n_groups % tp_size:
            raise ValueError(f"o_groups={n_groups} is not divisible by the tensor-parallel size {tp_size}")
        self.local_groups = n_groups // tp_size
        self.in_per_group = in_per_group
        self.out_per_group = out_per_group
        master = torch.empty(n_groups * out_per_group, in_per_group).normal_(0.0, init_std)
        rows = self.local_groups * out_per_group
        self.weight = nn.Parameter(master[tp_rank * rows : (tp_rank + 1) * rows].clone())
        self.weight.tensor_model_parallel = tp_size > 1
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1
        self.weight.v4_blocks = [out_per_group] * self.local_groups
        self.weight.v4_tp_whole_blocks = True  # TP shards hold whole groups, not slices of every group

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        """o: [..., g_local, n_h·c/g] -> [..., g_local·d_g]."""
        w = self.weight.view(self.local_groups, self.out_per_group, self.in_per_group)
        return torch.einsum("...gi,goi->...go", o, w).flatten(-2)

    def extra_repr(self) -> str:
        return f"groups={self.local_groups}, in_per_group={self.in_per_group}, out_per_group={self.out_per_group}"


class V4Attention(nn.Module):
    """One attention sub-layer of DeepSeek-V4 (see the module docstring).

    Args:
        cfg: ``pretrain.config.ModelConfig``.
        layer_type: "sliding" | "csa" | "hca".
        layer_idx: index of the layer (for names/logs).
        tp_group: tensor-parallel group (default: megatron's, if initialised; else no TP).
        parallel_config: megatron ``ModelParallelConfig`` for the parallel linears (default: CPU-safe flags).
    """

    def __init__(
        self,
        cfg: Any,
        layer_type: str,
        layer_idx: int,
        tp_group: Optional[dist.ProcessGroup] = None,
        parallel_config: Any = None,
    ):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        if layer_type not in LAYER_TYPES:
            raise ValueError(f"layer {layer_idx}: unknown layer type '{layer_type}'; use one of {LAYER_TYPES}")
        if cfg.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"model.attention_mode='{cfg.attention_mode}' unknown; use one of {ATTENTION_MODES}")
        self.layer_type = layer_type
        self.layer_idx = layer_idx
        self.cfg = cfg
        self.tp_group = _resolve_tp_group(tp_group)
        self.tp_size = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        tp_rank = dist.get_rank(self.tp_group) if self.tp_group is not None else 0
        if cfg.num_heads % self.tp_size or cfg.o_groups % self.tp_size:
            raise ValueError(
                f"model.num_heads={cfg.num_heads} and model.o_groups={cfg.o_groups} must be "
                f"divisible by the tensor-parallel size {self.tp_size}"
            )
        self.num_heads = cfg.num_heads
        self.local_heads = cfg.num_heads // self.tp_size
        self.head_dim = cfg.head_dim
        self.window = cfg.sliding_window
        self.scale = cfg.head_dim**-0.5
        self.eps = cfg.rms_norm_eps
        self.index_topk = cfg.index_topk
        self.attention_mode = cfg.attention_mode
        self.indexer_loss: Optional[torch.Tensor] = None
        self.recompute_core = False  # set by V4Block (recompute "selective"): see _core_attention
        pc = parallel_config if parallel_config is not None else megatron_parallel_config(self.tp_size)
        std = cfg.init_std

        def init_method(w: torch.Tensor) -> torch.Tensor:
            return nn.init.normal_(w, mean=0.0, std=std)

        d, d_c, c = cfg.hidden_size, cfg.q_lora_rank, cfg.head_dim
        self.q_a_proj = nn.Linear(d, d_c, bias=False)
        self.q_a_norm = RMSNorm(d_c, cfg.rms_norm_eps)
        self.q_b_proj = ColumnParallelLinear(
            d_c,
            cfg.num_heads * c,
            config=pc,
            init_method=init_method,
            bias=False,
            gather_output=False,
            tp_group=self.tp_group,
        )
        self.kv_proj = nn.Linear(d, c, bias=False)
        self.kv_norm = RMSNorm(c, cfg.rms_norm_eps)
        self.o_a_proj = GroupedOutputProjection(
            cfg.num_heads * c // cfg.o_groups, cfg.o_lora_rank, cfg.o_groups, self.tp_size, tp_rank, std
        )
        self.o_b_proj = RowParallelLinear(
            cfg.o_groups * cfg.o_lora_rank,
            d,
            config=pc,
            init_method=init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.tp_group,
        )
        self.sinks = nn.Parameter(torch.zeros(self.local_heads, dtype=torch.float32))
        self.sinks.tensor_model_parallel = self.tp_size > 1
        self.sinks.partition_dim = 0
        self.sinks.partition_stride = 1
        self.rotary = RotaryEmbedding.for_layer(cfg, layer_type)
        self.compressor: Optional[KVCompressor] = None
        if layer_type == "csa":
            self.compressor = KVCompressor(
                d, c, cfg.compress_rate_csa, overlap=True, eps=cfg.rms_norm_eps, init_std=std
            )
            # lives under the compressor to mirror HF/checkpoint names (compressor.indexer.*)
            self.compressor.indexer = LightningIndexer(cfg)
        elif layer_type == "hca":
            self.compressor = KVCompressor(
                d, c, cfg.compress_rate_hca, overlap=False, eps=cfg.rms_norm_eps, init_std=std
            )
        for lin in (self.q_a_proj, self.kv_proj):
            init_method(lin.weight)

    def _project_latent_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """c^Q = RMSNorm(x W^{DQ}); kv = RoPE(RMSNorm(x W^{KV}))."""
        return self.q_a_norm(self.q_a_proj(x)), op.apply_rope(self.kv_norm(self.kv_proj(x)), cos=cos, sin=sin)

    def _core_attention(
        self,
        q_latent: torch.Tensor,
        kv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        sinks: torch.Tensor,
        seg_start: Optional[torch.Tensor],
        comp_kv: Optional[torch.Tensor],
        lo: Optional[torch.Tensor],
        hi: Optional[torch.Tensor],
        idx: Optional[torch.Tensor],
        shard: SequenceShard,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q = RoPE(UnweightedRMSNorm(c^Q W^{UQ})) per local head, the hybrid attention and RoPE_{-t} of its output:
        c^Q [B, S_l, d_c] -> (o [B, S_l, h, c] de-rotated, q as attended, lse). Under Ulysses q goes head-parallel
        before the attention and o back after it (``shard``'s all-to-alls; the identity at sp = 1). The region of
        ``recompute=selective`` (pretrain.model.recompute): it keeps c^Q and kv and drops q, its norm, o and the
        softmax tensors."""
        B, S_l, _ = q_latent.shape
        cos_h, sin_h = cos[:, :, None], sin[:, :, None]
        q = self._parallel_linear(self.q_b_proj, q_latent).view(B, S_l, self.local_heads, self.head_dim)
        q = op.apply_rope(unweighted_rms_norm(q, self.eps), cos=cos_h, sin=sin_h)
        q = shard.heads_to_seq(q)  # [B, S, h/sp, c]
        o, lse = op.hybrid_attention(
            q,
            kv,
            sinks=sinks,
            scale=self.scale,
            window=self.window,
            seg_start=seg_start,
            comp_kv=comp_kv,
            comp_lo=lo,
            comp_hi=hi,
            comp_idx=idx,
        )
        o = shard.seq_to_heads(o)  # [B, S/sp, h, c]
        return op.apply_rope(o, cos=cos_h, sin=sin_h, inverse=True), q, lse  # RoPE at -t

    def _attend(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.recompute_core:
            from pretrain.model import recompute

            return recompute.checkpoint(self._core_attention, *args)
        return self._core_attention(*args)

    def _checked_mode(self) -> str:
        mode = self.attention_mode
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode='{mode}' unknown; use one of {ATTENTION_MODES}")
        return mode

    # -------------------------------------------------------------------------------------------------
    def _parallel_linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Megatron Column/RowParallelLinear; at tp = 1 a plain matmul (megatron's Row layer asserts on a
        process group even at one rank, and the attention must also run without torch.distributed)."""
        if self.tp_size == 1:
            return nn.functional.linear(x, layer.weight)
        return layer(x)[0]

    def _to_head_parallel(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated tensor used by the local heads only: identity forward, all-reduced gradient."""
        if self.tp_size == 1:
            return x
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(x, group=self.tp_group)

    def _check_inputs(
        self,
        x: torch.Tensor,
        doc_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        shard: SequenceShard,
    ) -> None:
        """x [B, S_l, d] is this rank's shard (S_l = S at sp = 1); ``doc_ids`` / ``position_ids`` cover the whole
        sequence [B, S]; under sp the local heads must split over the sp ranks."""
        if not shard.active:
            if x.dim() != 3 or x.shape[-1] != self.cfg.hidden_size:
                raise ValueError(
                    f"V4Attention (layer {self.layer_idx}) expects x [B, S, hidden_size="
                    f"{self.cfg.hidden_size}] (batch first), got {tuple(x.shape)}"
                )
            for name, t in (("doc_ids", doc_ids), ("position_ids", position_ids)):
                if t is not None and tuple(t.shape) != tuple(x.shape[:2]):
                    raise ValueError(
                        f"V4Attention (layer {self.layer_idx}): {name} must be [B, S] = "
                        f"{list(x.shape[:2])}, got {list(t.shape)}"
                    )
            return
        sp = shard.size
        if x.dim() != 3 or x.shape[-1] != self.cfg.hidden_size or self.local_heads % sp:
            raise ValueError(
                f"V4Attention (layer {self.layer_idx}) under sp={sp}: x must be [B, S/sp, "
                f"{self.cfg.hidden_size}] and the {self.local_heads} local heads divisible by sp; "
                f"got {tuple(x.shape)}"
            )
        B, S = x.shape[0], x.shape[1] * sp
        for name, t in (("doc_ids", doc_ids), ("position_ids", position_ids)):
            if t is not None and tuple(t.shape) != (B, S):
                raise ValueError(
                    f"V4Attention (layer {self.layer_idx}) under sp={sp}: {name} must cover the "
                    f"whole sequence [B, S] = {[B, S]}, got {list(t.shape)}"
                )

    def forward(
        self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x [B, S_l, d] -> [B, S_l, d]: this rank's S_l = S/sp tokens [r·S_l, (r+1)·S_l) of the sequence (all of
        it at sp = 1). ``doc_ids`` [B, S] document index per token (None = one document); ``position_ids``
        [B, S] RoPE positions (None = restart at 0 per document); both cover the WHOLE sequence. Sets
        ``indexer_loss``. The Ulysses exchanges (module docstring) are the steps of ``shard``, each the
        identity at sp = 1."""
        shard = SequenceShard.current()
        self._check_inputs(x, doc_ids, position_ids, shard)
        B, S_l, _ = x.shape
        S = S_l * shard.size
        seg_start = segment_starts(doc_ids, B, S, x.device) if doc_ids is not None else None
        if position_ids is None:
            position_ids = (
                document_positions(seg_start)
                if seg_start is not None
                else torch.arange(S, device=x.device).expand(B, S)
            )
        position_ids = position_ids.long()
        local_positions = shard.local(position_ids)  # [B, S_l]
        cos, sin = self.rotary(local_positions)  # [B, S_l, r/2]

        q_latent, kv = self._project_latent_kv(x, cos, sin)  # c^Q [B, S_l, d_c], kv [B, S_l, c]
        kv = self._to_head_parallel(shard.gather(kv))  # [B, S, c]

        self.indexer_loss = None
        comp_kv = lo = hi = idx = idx_loc = index_in = None
        mode = self._checked_mode()
        if self.compressor is not None:
            starts = seg_start if seg_start is not None else torch.zeros(B, S, dtype=torch.long, device=x.device)
            layout = compressed_layout(starts, position_ids, self.compressor.rate)
            x_full = shard.gather(x)  # [B, S, d]
            comp_kv = self._to_head_parallel(self.compressor(x_full, layout, self.rotary))  # [B, N, c]
            lo, hi = layout.visible_lo, layout.visible_hi
            if self.layer_type == "csa" and mode != "dense":  # the local queries against every compressed key
                lo_loc, hi_loc = shard.local(lo), shard.local(hi)
                index_in = self.compressor.indexer.score_inputs(
                    x.detach(), q_latent.detach(), local_positions, layout, self.rotary, keys_x=x_full.detach()
                )
                if mode == "sparse":
                    idx_loc = self._select(index_in, lo_loc, hi_loc)  # [B, S_l, k]
                    idx = shard.gather(idx_loc)  # [B, S, k]

        sinks = shard.local_heads(self.sinks)
        o, q, lse = self._attend(q_latent, kv, cos, sin, sinks, seg_start, comp_kv, lo, hi, idx, shard)
        if index_in is not None:  # q [B, S, h/sp, c] as attended
            q_loc, lse_loc = shard.local_queries(q, lse)  # every head of the local queries
            kl, rows = self._indexer_kl(index_in, q_loc, comp_kv, lse_loc, lo_loc, hi_loc, idx_loc)
            self.indexer_loss = shard.global_mean(kl, rows)
        o = self.o_a_proj(o.reshape(B, S_l, self.o_a_proj.local_groups, -1))
        return self._parallel_linear(self.o_b_proj, o)

    def _select(self, index_in: tuple[torch.Tensor, ...], lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Top-``index_topk`` entries per query (op ``indexer_select``: streamed, never the [S, N] scores; computed
        once per step under recompute, :func:`pretrain.model.recompute.memoized`)."""
        from pretrain.model import recompute

        q_i, keys_i, w_i = (t.detach() for t in index_in)
        # under recompute=full the selection of the first forward is reused, not scored again
        return recompute.memoized(
            self,
            lambda: op.indexer_select(q_i, keys=keys_i, weights=w_i, visible_lo=lo, visible_hi=hi, k=self.index_topk),
        )

    def _all_heads(self, q: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, S, h_local, c] and lse [B, S, h_local] of ALL heads (tp > 1: all-gathered, detached), so that the
        KL target Σ_h is summed over every head without an all-reduce of an [S, N] mass."""
        q, lse = q.detach(), lse.detach()
        if self.tp_size == 1:
            return q, lse
        parts_q = [torch.empty_like(q) for _ in range(self.tp_size)]
        parts_l = [torch.empty_like(lse) for _ in range(self.tp_size)]
        dist.all_gather(parts_q, q.contiguous(), group=self.tp_group)
        dist.all_gather(parts_l, lse.contiguous(), group=self.tp_group)
        return torch.cat(parts_q, dim=2), torch.cat(parts_l, dim=2)

    def _indexer_kl(
        self,
        index_in: tuple[torch.Tensor, ...],
        q: torch.Tensor,
        comp_kv: torch.Tensor,
        lse: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        idx: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL(main-attention mass ‖ softmax(index scores)) over the attended entries (§12.4), qualifying rows):
        op ``indexer_attention_kl``, streamed in query chunks and key blocks on the blocked backend."""
        q_all, lse_all = self._all_heads(q, lse)
        q_i, keys_i, w_i = index_in
        return op.indexer_attention_kl(
            q_i,
            keys_i=keys_i,
            w_i=w_i,
            q=q_all,
            comp_kv=comp_kv.detach(),
            lse=lse_all,
            scale=self.scale,
            lo=lo,
            hi=hi,
            idx=idx,
        )

    def extra_repr(self) -> str:
        return (
            f"layer_type={self.layer_type}, layer_idx={self.layer_idx}, heads={self.local_heads}/"
            f"{self.num_heads}, window={self.window}, mode={self.attention_mode}"
        )
