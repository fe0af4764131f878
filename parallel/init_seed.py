"""Layout-independent initialisation: ``train.seed`` determines the FULL model, whatever tp/pp/ep/etp.

megatron-core initialises each shard from the rank's own RNG stream (and the expert weights from a stream
that depends on the expert-parallel rank), so the same seed gives different models under different layouts.
:func:`init_layout_independent_` overwrites every parameter of this rank's model chunks with its slice of a
full tensor that depends only on ``(seed, canonical name)``:

    full(name)  = rule(name, full_shape, Generator(seed_of(seed, name)))       (on CPU, float32)
    local       = slice of full(name) that this rank holds (see below)

Canonical names are those of the single-process model (``DeepSeekV4Model`` with every layer):
* wrapper prefixes (``module.``, megatron DDP / Float16Module) are stripped;
* layers keep their global index in their names (the model does this for pipeline stages);
* a routed expert's local index ``i`` under expert parallelism becomes the global index
  ``ep_rank · (E / ep) + i`` (``...local_experts.<i>.`` -> ``...local_experts.<global>.``);
* names listed in ``aliases`` map to another canonical name (the last stage's MTP copy of the embedding,
  ``mtp_embed_tokens.weight`` -> ``embed_tokens.weight``, so both copies start equal).

Slicing (megatron's attributes ``tensor_model_parallel`` / ``partition_dim``; expert weights use the expert
tensor-parallel group, everything else the tensor-parallel group, size ``t``, rank ``r``):
* plain: full dim ``partition_dim`` = t · local; the rank holds the contiguous block ``r`` (Column/Row
  parallel linears, vocabulary-parallel embedding, grouped output projection, sinks);
* gated fc1 (SwiGLU ``linear_fc1`` of experts and the shared expert, ``[gate; up]`` in the full matrix):
  megatron keeps ``[gate_r; up_r]`` on rank r, i.e. block r of each half (``v4_blocks`` in
  docs/CONTRACTS.md);
* not tensor-parallel: the rank holds the full tensor (replicated).

Cost: each rank materialises, one at a time, the full tensor of every parameter it holds a slice of (the
largest is the embedding, vocab × d: 2.1 GB for Flash in fp32). Parameters on the meta device are skipped.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from parallel.param_meta import is_expert_param

log = logging.getLogger(__name__)

Rule = Callable[[str, nn.Parameter, tuple, torch.Generator], torch.Tensor | None]

_EXPERT_RE = re.compile(r"(\.local_experts\.)(\d+)(\.)")
_WRAPPERS = ("module.",)


def seed_of(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, canonical name); stable across Python runs (no ``hash()``)."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if name.startswith(w):
                name, changed = name[len(w) :], True
    return name


def is_gated_fc1(name: str) -> bool:
    return name.endswith("linear_fc1.weight")


def canonical_name(
    name: str, ep_rank: int = 0, num_local_experts: int = 0, aliases: dict[str, str] | None = None
) -> str:
    """Name of ``name`` (a local parameter name) in the single-process model."""
    name = strip_wrappers(name)
    if num_local_experts and ".local_experts." in name:
        name = _EXPERT_RE.sub(
            lambda m: f"{m.group(1)}{ep_rank * num_local_experts + int(m.group(2))}{m.group(3)}", name, count=1
        )
    return (aliases or {}).get(name, name)


def full_shape(p: torch.Tensor, tp_size: int) -> tuple:
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False) and tp_size > 1:
        shape[p.partition_dim] *= tp_size
    return tuple(shape)


def local_slice(full: torch.Tensor, p: torch.Tensor, name: str, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This rank's part of ``full`` (see the module docstring)."""
    if not getattr(p, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = p.partition_dim
    if is_gated_fc1(name) and dim == 0:
        halves = full.chunk(2, dim=0)
        return torch.cat([h.chunk(tp_size, dim=0)[tp_rank] for h in halves], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def normal_rule(std: float, xavier: Callable[[str], bool] = lambda n: False) -> Rule:
    """Default rule: parameters whose current values are all equal (norm weights = 1, sinks/biases = 0,
    mHC gates = α) were initialised by a constant, which is already layout-independent: keep them (None).
    Names for which ``xavier(name)`` holds get Xavier-uniform over the full shape (fan_out = dim 0,
    fan_in = dim 1); everything else N(0, std²)."""

    def rule(name: str, p: nn.Parameter, shape: tuple, g: torch.Generator) -> torch.Tensor | None:
        if p.numel() == 0 or bool((p.detach() == p.detach().reshape(-1)[0]).all()):
            return None
        if xavier(name):
            fan_out, fan_in = shape[0], math.prod(shape[1:])
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=g)
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g)

    return rule


@torch.no_grad()
def init_layout_independent_(
    chunks: Iterable[nn.Module],
    seed: int,
    rule: Rule,
    aliases: dict[str, str] | None = None,
    tp: tuple[int, int] | None = None,
    etp: tuple[int, int] | None = None,
    ep: tuple[int, int] | None = None,
    num_experts: int = 0,
) -> int:
    """Overwrite the parameters of ``chunks`` (this rank's model chunks) with layout-independent values.

    ``tp``/``etp``/``ep`` are (size, rank) pairs; by default they come from megatron's ``parallel_state``.
    ``num_experts`` is the number of routed experts E of the model (needed when ep > 1).
    Returns the number of parameters (tensors) written.
    """
    if tp is None or etp is None or ep is None:
        from megatron.core import parallel_state as ps

        tp = tp or (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank())
        etp = etp or (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank())
        ep = ep or (ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank())
    if ep[0] > 1 and (num_experts <= 0 or num_experts % ep[0]):
        raise ValueError(
            f"init_layout_independent_: num_experts={num_experts} must be a positive multiple of ep={ep[0]}"
        )
    n_local = num_experts // ep[0] if num_experts else 0
    written = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if p.device.type == "meta":
                continue
            expert = is_expert_param(p)
            size, rank = etp if expert else tp
            cname = canonical_name(name, ep[1], n_local if expert else 0, aliases)
            shape = full_shape(p, size)
            g = torch.Generator(device="cpu").manual_seed(seed_of(seed, cname))
            full = rule(cname, p, shape, g)
            if full is None:
                continue
            if tuple(full.shape) != shape:
                raise ValueError(f"init rule for {cname} returned {tuple(full.shape)}, expected {shape}")
            p.copy_(local_slice(full, p, cname, size, rank).to(p.dtype))
            written += 1
    log.debug("layout-independent init: %d tensors written (seed %d)", written, seed)
    return written


def _gather_full(p: torch.Tensor, name: str, group, size: int) -> torch.Tensor:
    """Inverse of :func:`local_slice` over ``group`` (collective; every member calls it for the same name)."""
    import torch.distributed as dist

    if not getattr(p, "tensor_model_parallel", False) or size == 1:
        return p.detach().clone()
    parts = [torch.empty_like(p) for _ in range(size)]
    dist.all_gather(parts, p.detach().contiguous(), group=group)
    dim = p.partition_dim
    if is_gated_fc1(name) and dim == 0:
        halves = [pt.chunk(2, dim=0) for pt in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def gather_full_state(chunks: Iterable[nn.Module], num_experts: int = 0) -> dict[str, torch.Tensor]:
    """The full single-process parameters {canonical name: tensor} assembled from every rank (collective over
    the whole world; returned on every rank). The MTP copy of the embedding keeps its own name so callers can
    check that it equals ``embed_tokens.weight``. For tests and layout comparisons (small models)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank())
    etp = (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank())
    ep = (ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank())
    n_local = num_experts // ep[0] if num_experts else 0
    mine: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            expert = is_expert_param(p)
            (size, rank), group = (
                (etp, ps.get_expert_tensor_parallel_group()) if expert else (tp, ps.get_tensor_model_parallel_group())
            )
            cname = canonical_name(name, ep[1], n_local if expert else 0)
            full = _gather_full(p, cname, group, size)
            if rank == 0:
                mine[cname] = full.cpu()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    out: dict[str, torch.Tensor] = {}
    for d in every:
        out.update(d)
    return out
