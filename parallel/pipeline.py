"""Pipeline stages and the glue to megatron-core's schedules (1F1B, interleaved virtual stages) and DDP.

Stage split. The model's L layers are cut into ``pp · vpp`` virtual stages s = 0 .. pp·vpp − 1 (megatron's
interleaved order: pipeline rank r holds the virtual stages s = v·pp + r for v = 0 .. vpp − 1, one model
chunk each). ``pp_layer_split`` gives the layers per virtual stage (first/last may be lighter, since they
also hold the embedding / head + MTP); empty = even split. Stage s holds layers [Σ_{s'<s} n_s', Σ_{s'≤s} n_s').
The embedding is on stage 0 (``pre_process``), hc_head / norm / head / MTP on stage pp·vpp − 1
(``post_process``).

What flows between stages is the mHC residual state X ∈ [B, S, n, d]. megatron's p2p sends tensors of shape
[seq, micro_batch, hidden], so :class:`PipelineStage` sends X as [S, B, n·d] (the schedule's config copy has
``hidden_size = n·d``) and restores [B, S, n, d] on receipt.

Losses. Every micro-batch's last-stage output is the model's loss (token-mean LM + λ·MTP + the last stage's
auxiliary losses); the schedule divides it by the number of micro-batches M (megatron's 3-tuple loss path
with a token count of 1, so no context-parallel rescaling), DDP averages gradients over the data-parallel
ranks: the gradient is that of (1/(dp·M)) Σ_micro-batches loss, the mean over the global batch whatever the
layout. Auxiliary losses of non-last stages (balance, indexer) enter the backward through megatron's
``MoEAuxLossAutoScaler`` attached to the stage output (scaled by 1/M like the main loss) and are added to the
reported loss (summed over the pipeline group). (megatron scales that auto-scaler by cp/M; under Ulysses
the stage divides its aux loss by sp to keep 1/M.) :func:`forward_backward` returns the global-batch mean of each
loss component on every rank.

Shared embedding: when pp > 1 the last stage owns a copy of the embedding for the MTP input (parameter
attribute ``shared_embedding``); both copies start equal (layout-independent init) and their gradients are
summed over megatron's embedding group (first and last stage) in :func:`finalize_grads`, so they stay equal.

Expert bias: :func:`update_expert_bias` sums the routers' token counts over the TP × DP × CP group (every rank
of a pipeline stage, expert-parallel ranks included), so every rank applies the same b ← b + γ·sign(mean − load).
The counters grow once per micro-batch forward; a block recomputed in the backward (activation recomputation,
``model.recompute``) must not count again: the model restores them after each recompute.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

Provider = Callable[[bool, bool, tuple[int, int], int], nn.Module]
LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "indexer_loss")


# --------------------------------------------------------------------------------------------- stage split
def stage_layer_ranges(
    num_layers: int, pp: int, vpp: int = 1, split: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """[lo, hi) layer range of every virtual stage s = 0 .. pp·vpp − 1 (validated)."""
    stages = pp * vpp
    if split:
        split = list(split)
        if len(split) != stages:
            raise ValueError(f"pp_layer_split has {len(split)} entries; need pp*vpp = {pp}*{vpp} = {stages}")
        if min(split) < 0 or sum(split) != num_layers:
            raise ValueError(
                f"pp_layer_split {split} must be non-negative and sum to num_layers={num_layers} "
                f"(it sums to {sum(split)})"
            )
    else:
        if num_layers % stages:
            raise ValueError(
                f"num_layers={num_layers} is not divisible by pp*vpp = {stages}; give pp_layer_split explicitly"
            )
        split = [num_layers // stages] * stages
    out, lo = [], 0
    for n in split:
        out.append((lo, lo + n))
        lo += n
    return out


def chunk_stages(pp_rank: int, pp: int, vpp: int = 1) -> list[int]:
    """Virtual stages held by pipeline rank ``pp_rank``, in chunk order (megatron's interleaving)."""
    return [v * pp + pp_rank for v in range(vpp)]


# --------------------------------------------------------------------------------------------- stage module
class PipelineStage(nn.Module):
    """One model chunk as megatron's schedules see it.

    ``module`` is the model of this virtual stage (``DeepSeekV4Model(pre_process, post_process, layer_range)``
    or any module with the same forward contract). ``forward(batch)`` returns the loss (last stage; the loss
    components are accumulated in ``sums``) or the stream state as [S, B, n·d] (other stages);
    ``sums`` accumulates the detached loss components of the micro-batches (:func:`reduce_losses`).
    """

    share_embeddings_and_output_weights = False  # read by megatron's finalize_model_grads

    @property
    def model_type(self):  # read by megatron's schedules
        from megatron.core.enums import ModelType

        return ModelType.encoder_or_decoder

    def __init__(self, module: nn.Module, pre_process: bool, post_process: bool, vp_stage: int, hc_mult: int):
        super().__init__()
        self.module = module
        self.pre_process, self.post_process, self.vp_stage, self.hc_mult = pre_process, post_process, vp_stage, hc_mult
        self.sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)  # Σ over micro-batches, detached

    def _stage_aux_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ balance and Σ indexer losses of this (non-last) stage's last forward (router / attention attrs)."""
        bal = torch.zeros((), dtype=torch.float64)
        idx = torch.zeros((), dtype=torch.float64)
        for m in self.module.modules():
            v = getattr(m, "balance_loss", None)
            if isinstance(v, torch.Tensor):
                bal += v.detach().double().cpu()
            v = getattr(m, "indexer_loss", None)
            if isinstance(v, torch.Tensor) and not isinstance(m, PipelineStage):
                idx += v.detach().double().cpu()
        return bal, idx

    def set_input_tensor(self, input_tensor: Any) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if input_tensor is not None:
            s, b, nd = input_tensor.shape
            input_tensor = input_tensor.view(s, b, self.hc_mult, nd // self.hc_mult).transpose(0, 1)
        self.module.set_input_tensor(input_tensor)

    def forward(self, batch: dict[str, torch.Tensor], mtp_lambda: float = 0.3) -> torch.Tensor:
        from parallel import sequence_parallel as usp

        if usp.sp_group() is not None:  # Ulysses: this rank's contiguous shard of every [B, S] input
            batch = {k: usp.shard(v) for k, v in batch.items()}
        out = self.module(
            batch["input_ids"],
            doc_ids=batch.get("doc_ids"),
            labels=batch["labels"],
            mtp_labels=batch.get("mtp_labels"),
            mtp_lambda=mtp_lambda,
        )
        if self.post_process:
            self.sums += torch.stack([out[k].detach().double().cpu() for k in LOSS_KEYS])
            return out["loss"]
        b, s, n, d = out.shape
        # contiguous: with micro_batch > 1 the reshape of the transpose is a strided view, which p2p refuses
        send = out.transpose(0, 1).reshape(s, b, n * d).contiguous()
        aux = getattr(self.module, "stage_aux_loss", None)
        if aux is not None:
            bal, idx = self._stage_aux_components()
            self.sums += torch.stack(
                [
                    aux.detach().double().cpu(),
                    torch.zeros((), dtype=torch.float64),
                    torch.zeros((), dtype=torch.float64),
                    bal,
                    idx,
                ]
            )
            if aux.requires_grad:
                # megatron sets the auto-scaler's gradient to cp/M (schedules.forward_step_calc_loss); our sp
                # ranks' losses already average to the full loss, so divide the cp factor out
                from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

                sp, _ = usp.sp_size_rank()
                send = MoEAuxLossAutoScaler.apply(send, aux / sp if sp > 1 else aux)
        return send


def unwrap(chunk: nn.Module) -> PipelineStage:
    while not isinstance(chunk, PipelineStage):
        chunk = chunk.module
    return chunk


# --------------------------------------------------------------------------------------------- building
def schedule_config(model_config: Any, hc_mult: int, vpp: int) -> Any:
    """Copy of the model's megatron TransformerConfig for DDP and the schedules: p2p tensors are
    [S, B, n·d]; activations outside the MoE are replicated over TP (no sequence-parallel split); the expert
    bias is updated by :func:`update_expert_bias` (after the optimizer step), not in finalize_model_grads."""
    cfg = copy.copy(model_config)
    cfg.hidden_size = model_config.hidden_size * hc_mult
    cfg.sequence_parallel = False
    cfg.moe_router_enable_expert_bias = False
    cfg.virtual_pipeline_model_parallel_size = vpp if vpp > 1 else None
    cfg.variable_seq_lengths = False
    if not torch.cuda.is_available():
        cfg.batch_p2p_comm = False  # wrong results on gloo at pp = 2 (docs/STACK.md §4)
        cfg.overlap_p2p_comm = False
    cfg.no_sync_func = cfg.grad_sync_func = cfg.param_sync_func = None
    cfg.finalize_model_grads_func = None
    return cfg


def build_model_chunks(
    provider: Provider,
    num_layers: int,
    hc_mult: int,
    pp_layer_split: Sequence[int] | None = None,
    init: Callable[[list[nn.Module]], None] | None = None,
    wrap_ddp: bool = True,
    ddp_config: Any = None,
) -> list[nn.Module]:
    """This rank's model chunks (one per virtual stage), wrapped in :class:`PipelineStage` and megatron DDP.

    ``provider(pre_process, post_process, layer_range, vp_stage)`` builds one stage's model; it must expose its
    megatron TransformerConfig as ``moe_config`` or ``config``. ``init(list_of_stage_modules)`` runs before
    the DDP wrap (layout-independent initialisation, :mod:`parallel.init_seed`).
    DDP: fp32 gradient buffers; overlapped, bucketed reduction on GPU (buckets only for the first chunk,
    as megatron's training loop does), a plain reduction after the backward on CPU.
    """
    from megatron.core import parallel_state as ps

    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    ranges = stage_layer_ranges(num_layers, pp, vpp, pp_layer_split)
    last = pp * vpp - 1
    stages = []
    for v, s in enumerate(chunk_stages(pp_rank, pp, vpp)):
        model = provider(s == 0, s == last, ranges[s], v)
        stages.append(PipelineStage(model, s == 0, s == last, v, hc_mult))
    if init is not None:
        init([st.module for st in stages])
    log.info(
        "pipeline rank %d/%d: virtual stages %s, layers %s",
        pp_rank,
        pp,
        chunk_stages(pp_rank, pp, vpp),
        [ranges[s] for s in chunk_stages(pp_rank, pp, vpp)],
    )
    if not wrap_ddp:
        return stages
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
    )

    base = getattr(stages[0].module, "moe_config", None) or stages[0].module.config
    cfg = schedule_config(base, hc_mult, vpp)
    if ddp_config is None:
        gpu = torch.cuda.is_available()
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=gpu,
            use_distributed_optimizer=False,
            bucket_size=None if not gpu else 40_000_000,
        )
    chunks = [DistributedDataParallel(cfg, ddp_config, st, disable_bucketing=i > 0) for i, st in enumerate(stages)]
    nosync = [c.no_sync for c in chunks]
    cfg.no_sync_func = nosync[0] if len(chunks) == 1 else nosync
    return chunks


# --------------------------------------------------------------------------------------------- step
def _pp_and_dp_groups():
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group(), ps.get_data_parallel_group(with_context_parallel=True)


def forward_backward(
    chunks: list[nn.Module],
    microbatches: Sequence[dict[str, torch.Tensor]],
    mtp_lambda: float = 0.3,
    forward_only: bool = False,
) -> dict[str, float]:
    """Run megatron's schedule over this data-parallel rank's micro-batches; returns the global-batch mean
    of every loss component (``LOSS_KEYS``), identical on all ranks.

    ``microbatches``: dicts with ``input_ids``, ``labels``, ``mtp_labels``, ``doc_ids`` ([B, S] each;
    pretrain.step_utils.split_batch). Gradients are accumulated into DDP's ``main_grad``; call
    :func:`finalize_grads` afterwards (not done here so the caller can time/guard it).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("forward_backward: no micro-batches for this rank")
    stages = [unwrap(c) for c in chunks]
    for st in stages:
        st.sums.zero_()
    b, s = microbatches[0]["input_ids"].shape
    m = len(microbatches)

    def loss_func(output: torch.Tensor):
        return output, torch.ones((), dtype=torch.int), {"loss": output.detach()}

    def step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch, mtp_lambda=mtp_lambda), loss_func

    iters = [iter(microbatches) for _ in chunks]
    fb = get_forward_backward_func()
    fb(
        forward_step_func=step,
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=m,
        seq_length=s,
        micro_batch_size=b,
        forward_only=forward_only,
    )
    return reduce_losses(stages, m)


def reduce_losses(stages: list[PipelineStage], m: int) -> dict[str, float]:
    """Global-batch mean of each loss component: Σ over this rank's chunks, summed over the pipeline group
    (each stage contributes its own layers' terms), averaged over the M micro-batches and the data-parallel
    (× context-parallel) ranks."""
    pp_group, dp_group = _pp_and_dp_groups()
    sums = sum((st.sums for st in stages), torch.zeros(len(LOSS_KEYS), dtype=torch.float64))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums, group=pp_group)
        dist.all_reduce(sums, group=dp_group)
        sums /= dist.get_world_size(dp_group)
    return {k: float(v) / m for k, v in zip(LOSS_KEYS, sums.tolist())}


def finalize_grads(chunks: list[nn.Module]) -> None:
    """After the backward of a global batch: megatron's ``finalize_model_grads`` (data-parallel reduction,
    experts over expert-data-parallel; scaled 1/dp), the TP sum of gradients of parameters that see only a
    sequence chunk per TP rank (``sequence_parallel`` attribute: the MoE routers), and the sum of the shared
    embedding's gradients over the first and last stage. Then ``p.grad = p.main_grad`` for the optimizers."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(chunks)
    params = [p for c in chunks for p in c.parameters() if p.requires_grad]
    tp_group = ps.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) > 1:
        for p in params:
            if getattr(p, "sequence_parallel", False) and p.main_grad is not None:
                dist.all_reduce(p.main_grad, group=tp_group)
    emb_group = ps.get_embedding_group(check_initialized=False)
    if (
        emb_group is not None
        and dist.get_world_size(emb_group) > 1
        and dist.get_rank() in dist.get_process_group_ranks(emb_group)
    ):
        shared = [
            p
            for st in (unwrap(c) for c in chunks)
            for n, p in st.module.named_parameters()
            if (st.pre_process and n == "embed_tokens.weight") or getattr(p, "shared_embedding", False)
        ]
        flag = torch.tensor([len(shared)], dtype=torch.int64)  # both ends must hold a copy (MTP on)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=emb_group)
        if int(flag) > 0:
            dist.all_reduce(shared[0].main_grad, group=emb_group)
    for p in params:
        p.grad = p.main_grad


def zero_grads(chunks: list[nn.Module]) -> None:
    for c in chunks:
        c.zero_grad_buffer()
        for p in c.parameters():
            p.grad = None


# --------------------------------------------------------------------------------------------- expert bias
def _routers(chunks: Iterable[nn.Module]) -> list[nn.Module]:
    return [
        m
        for c in chunks
        for m in c.modules()
        if getattr(m, "expert_bias", None) is not None and hasattr(m, "local_tokens_per_expert")
    ]


@torch.no_grad()
def update_expert_bias(chunks: list[nn.Module], rate: float) -> torch.Tensor | None:
    """b ← b + rate·sign(mean(load) − load) for every learned router of this rank, with the loads of the
    global batch (counts summed over TP × DP × CP, i.e. over all ranks of the stage, expert-parallel ones
    included; TP ranks count the same tokens, which scales all loads alike and leaves the sign unchanged).
    Resets the counters; returns the loads [n_routers, E] (None without routers)."""
    from megatron.core import parallel_state as ps

    rs = _routers(chunks)
    if not rs:
        return None
    loads = torch.stack([r.local_tokens_per_expert.detach().float() for r in rs])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loads, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
    for i, r in enumerate(rs):
        if rate > 0 and r.training:
            load = loads[i].to(r.expert_bias.device)
            r.expert_bias.add_(torch.sign(load.mean() - load).to(r.expert_bias.dtype), alpha=rate)
        r.local_tokens_per_expert.zero_()
    return loads
