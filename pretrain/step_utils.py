"""Per-step helpers of the trainer that talk to the model and megatron-core's parallel state.

- :func:`split_batch`: a loader micro-batch (``tokens``/``doc_ids`` ``[B, S+1]``) -> model inputs
  (docs/CONTRACTS.md: input_ids = tokens[:, :-1], labels = tokens[:, 1:], MTP labels = tokens[:, 2:] padded
  with -100, doc_ids[:, :-1]).
- :func:`grad_norm`: global gradient 2-norm over TP/PP/EP without double counting replicated shards.
- :func:`load_stats`: expert-load balance numbers from the loads ``parallel.pipeline.update_expert_bias``
  returns (tokens per expert of the global batch, per router).
- :func:`set_attention_mode`, :func:`frozen_for_indexer_warmup`.
- :func:`activated_params` and :func:`peak_flops` for the MFU estimate.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def split_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    tokens = torch.as_tensor(batch["tokens"]).to(device, torch.long, non_blocking=True)
    doc = torch.as_tensor(batch["doc_ids"]).to(device, non_blocking=True)
    if tokens.dim() != 2 or tokens.shape[1] < 3 or doc.shape != tokens.shape:
        raise ValueError(f"loader batch: tokens {tuple(tokens.shape)} / doc_ids {tuple(doc.shape)}; expected "
                         f"equal [B, seq_len + 1] shapes (docs/CONTRACTS.md)")
    mtp = torch.full_like(tokens[:, 1:], IGNORE_INDEX)
    mtp[:, :-1] = tokens[:, 2:]
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "mtp_labels": mtp, "doc_ids": doc[:, :-1]}


def is_expert(p: torch.Tensor) -> bool:
    return bool(getattr(p, "v4_expert", False)) or getattr(p, "allreduce", True) is False


def grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """Global 2-norm of ``p.grad`` (after the data-parallel reduction)."""
    from megatron.core import parallel_state as ps
    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    tp_rank = ps.get_tensor_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    for p in params:
        if p.grad is None or getattr(p, "shared_embedding", False):   # the last stage's embedding copy
            continue
        sharded = bool(getattr(p, "tensor_model_parallel", False))
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if is_expert(p):
            if sharded or etp_rank == 0:
                expert += sq
        elif sharded or tp_rank == 0:
            dense += sq
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(dense, group=ps.get_model_parallel_group())
        dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return float((dense + expert).sqrt())


def clip_(params: Iterable[torch.nn.Parameter], norm: float, max_norm: float) -> None:
    if max_norm <= 0 or norm <= max_norm:
        return
    scale = max_norm / (norm + 1e-6)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)


def load_stats(loads: torch.Tensor | None) -> dict[str, float | None]:
    if loads is None or loads.sum() == 0:
        return {"expert_load_max_over_mean": None, "expert_load_cv": None}
    mean = loads.mean(dim=1, keepdim=True).clamp(min=1e-9)
    return {"expert_load_max_over_mean": float((loads.max(dim=1).values / mean.squeeze(1)).mean()),
            "expert_load_cv": float((loads.std(dim=1, unbiased=False) / mean.squeeze(1)).mean())}


def set_attention_mode(model: torch.nn.Module, mode: str) -> None:
    for m in model.modules():
        if hasattr(m, "attention_mode") and isinstance(m.attention_mode, str):
            m.attention_mode = mode


def frozen_for_indexer_warmup(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters outside the lightning indexers (frozen during the indexer warm-up, §12.4)."""
    return [p for n, p in model.named_parameters() if ".indexer." not in f".{n}"]


def activated_params(model: torch.nn.Module, n_routed: int, top_k: int) -> float:
    """Parameters one token touches: routed experts count K_r / N_r of their size (per rank)."""
    total = 0.0
    for p in model.parameters():
        total += p.numel() * (top_k / n_routed if is_expert(p) else 1.0)
    return total


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
    return 2 * 256 ** 3 * n / dt


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
