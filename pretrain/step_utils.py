"""Per-step helpers of the trainer that talk to the model and megatron-core's parallel state.

- :func:`split_batch`: a loader micro-batch (``tokens``/``doc_ids`` ``[B, S+1]``) -> model inputs
  (docs/CONTRACTS.md: input_ids = tokens[:, :-1], labels = tokens[:, 1:], MTP labels = tokens[:, 2:] padded
  with -100, doc_ids[:, :-1]).
- :func:`grad_norm`: global gradient 2-norm over TP/PP/EP without double counting replicated shards.
- :func:`load_stats`: expert-load balance numbers from the loads ``parallel.pipeline.update_expert_bias``
  returns (tokens per expert of the global batch, per router), averaged over the routers of every stage.
- :func:`set_attention_mode`, :func:`frozen_for_indexer_warmup`.
- :func:`activated_params` (the whole model's, summed over the model-parallel ranks) and :func:`peak_flops`
  for the MFU estimate.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist

from ops.linear_cross_entropy import IGNORE_INDEX
from parallel.param_meta import is_expert_param

log = logging.getLogger(__name__)


def split_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    tokens = torch.as_tensor(batch["tokens"]).to(device, torch.long, non_blocking=True)
    doc = torch.as_tensor(batch["doc_ids"]).to(device, non_blocking=True)
    if tokens.dim() != 2 or tokens.shape[1] < 3 or doc.shape != tokens.shape:
        raise ValueError(
            f"loader batch: tokens {tuple(tokens.shape)} / doc_ids {tuple(doc.shape)}; expected "
            f"equal [B, seq_len + 1] shapes (docs/CONTRACTS.md)"
        )
    mtp = torch.full_like(tokens[:, 1:], IGNORE_INDEX)
    mtp[:, :-1] = tokens[:, 2:]
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "mtp_labels": mtp, "doc_ids": doc[:, :-1]}


def _collective_device() -> torch.device:
    """Where the step's small reductions live: the current GPU under NCCL (it reduces device tensors only),
    else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _model_sum(params: Iterable[torch.nn.Parameter], value) -> float:
    """Σ ``value(p)`` over the whole model, each tensor counted once: dense parameters summed over TP × PP
    (TP-replicated ones counted on TP rank 0 only), experts over ETP × EP × PP (ETP-replicated ones on ETP
    rank 0); the last stage's copy of the embedding (``shared_embedding``) is skipped. ``value`` returns a
    float64 scalar tensor or None (skip). Collective over the model-parallel groups."""
    from megatron.core import parallel_state as ps

    dev = _collective_device()  # summed where the values are: one host sync at the end, not per tensor
    dense = torch.zeros((), dtype=torch.float64, device=dev)
    expert = torch.zeros((), dtype=torch.float64, device=dev)
    tp_rank = ps.get_tensor_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    for p in params:
        if getattr(p, "shared_embedding", False):
            continue
        v = value(p)
        if v is None:
            continue
        v = v.to(dev)
        sharded = bool(getattr(p, "tensor_model_parallel", False))
        if is_expert_param(p):
            if sharded or etp_rank == 0:
                expert += v
        elif sharded or tp_rank == 0:
            dense += v
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(dense, group=ps.get_model_parallel_group())
        dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return float(dense + expert)


def grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """Global 2-norm of ``p.grad`` (after the data-parallel reduction)."""
    return math.sqrt(_model_sum(params, lambda p: None if p.grad is None else p.grad.detach().double().pow(2).sum()))


def clip_(params: Iterable[torch.nn.Parameter], norm: float, max_norm: float) -> None:
    if max_norm <= 0 or norm <= max_norm:
        return
    scale = max_norm / (norm + 1e-6)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)


def load_stats(loads: torch.Tensor | None) -> dict[str, float | None]:
    """Mean over all learned routers of the model (every pipeline stage: collective over the pipeline group)
    of max/mean and the coefficient of variation of the per-expert loads of the global batch."""
    from megatron.core import parallel_state as ps

    dev = _collective_device()
    acc = torch.zeros(3, dtype=torch.float64, device=dev)  # Σ max/mean, Σ cv, number of routers
    if loads is not None and loads.sum() > 0:
        loads = loads.to(dev, torch.float64)
        mean = loads.mean(dim=1).clamp(min=1e-9)
        acc += torch.stack(
            [
                (loads.max(dim=1).values / mean).sum(),
                (loads.std(dim=1, unbiased=False) / mean).sum(),
                torch.tensor(float(loads.shape[0]), dtype=torch.float64, device=dev),
            ]
        )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(acc, group=ps.get_pipeline_model_parallel_group())
    if acc[2] == 0:
        return {"expert_load_max_over_mean": None, "expert_load_cv": None}
    return {"expert_load_max_over_mean": float(acc[0] / acc[2]), "expert_load_cv": float(acc[1] / acc[2])}


def set_attention_mode(model: torch.nn.Module, mode: str) -> None:
    for m in model.modules():
        if hasattr(m, "attention_mode") and isinstance(m.attention_mode, str):
            m.attention_mode = mode


def frozen_for_indexer_warmup(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters outside the lightning indexers (frozen during the indexer warm-up, §12.4)."""
    return [p for n, p in model.named_parameters() if ".indexer." not in f".{n}"]


def activated_params(params: Iterable[torch.nn.Parameter], n_routed: int, top_k: int) -> float:
    """Parameters of the whole model one token touches (routed experts count K_r / N_r of their size),
    summed over the model-parallel ranks (collective)."""
    factor = top_k / n_routed
    return _model_sum(
        params, lambda p: torch.tensor(p.numel() * (factor if is_expert_param(p) else 1.0), dtype=torch.float64)
    )


_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12}


def peak_flops(configured_tflops: float = 0.0) -> float:
    """Per-rank peak FLOP/s: configured, else a table of GPUs (dense bf16), else a short fp32 CPU probe."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for k, v in _GPU_PEAK_BF16.items():
            if k in name:
                return v
        return 312e12
    a = torch.randn(256, 256)
    b = torch.randn(256, 256)
    a @ b
    t0 = time.perf_counter()
    n = 20
    for _ in range(n):
        a @ b
    dt = max(time.perf_counter() - t0, 1e-6)
    return 2 * 256**3 * n / dt


def router_autocast_safe() -> None:
    """megatron's router gating linear under ``torch.autocast``: its custom autograd Function computes the
    logits in fp32 (``moe_router_dtype``) but autocast turns the mm inside into bf16, and its backward then
    multiplies a bf16 grad with an fp32 weight (``expected mat1 and mat2 to have the same dtype``). Run it
    with autocast off (inputs are cast to the router dtype inside anyway). Idempotent."""
    from megatron.core.transformer.moe import router

    fn = router.router_gating_linear
    if getattr(fn, "_autocast_safe", False):
        return

    def gating(inp, weight, bias, router_dtype):
        with torch.autocast(device_type=inp.device.type, enabled=False):
            return fn(inp, weight, bias, router_dtype)

    gating._autocast_safe = True
    router.router_gating_linear = gating
