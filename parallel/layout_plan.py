"""Layout dry-run machinery: build a rank's shard on the meta device under a fake process group.

``fake_rank(world, rank, layout)`` starts torch.distributed's ``fake`` backend (collectives are no-ops, nothing
is allocated or sent) as rank ``rank`` of ``world``, initialises megatron's ``parallel_state`` for ``layout``
(without gloo side groups) and tears everything down on exit. Inside, a model built under
``torch.device("meta")`` is exactly the shard that rank would hold — same classes, same shapes — with no memory.

``representative_ranks(layout)``: shard sizes are identical across the tensor-, expert- and data-parallel
ranks of one pipeline rank (heads, vocabulary, experts and widths divide evenly — :func:`compute_layout`
checks this), so one rank per pipeline rank (its first global rank in megatron's ``tp-cp-ep-dp-pp`` order:
pp_rank · world/pp) stands for all of them.

``shard_memory(modules)``: bytes per rank of
* parameters: fp32 master weights (4 B/param; bf16 compute copies are transient autocast casts);
* gradients: fp32 ``main_grad`` buffers of megatron's DDP (``grad_reduce_in_fp32``; 4 B/param);
* optimizer state: what the optimizers hold on the most loaded rank of the stage
  (:mod:`parallel.optimizer_memory`: Muon momentum on its units' owner ranks, from Muon's own plan; AdamW's two
  moments), attached by the caller as ``ShardMemory.optimizer``. Without it: the replicated upper bound, Muon
  4 B and AdamW 8 B per parameter, routed by ``parallel.optimizer_groups.OPTIMIZER_ROUTES``.
Activation memory is model-specific and estimated by the caller (``pretrain.dry_run``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import nn

from parallel.optimizer_groups import optimizer_of
from parallel.optimizer_memory import StageOptimizerMemory
from parallel.param_meta import is_expert_param
from parallel.process_groups import Layout

log = logging.getLogger(__name__)

GiB = 1024**3
OPTIMIZER_BYTES = {"muon": 4, "adamw": 8}


@contextlib.contextmanager
def fake_rank(world: int, rank: int, layout: Layout) -> Iterator[None]:
    """Be rank ``rank`` of a fake ``world``-rank job with megatron's groups for ``layout``."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from parallel import cpu_compat

    cpu_compat.apply()
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        raise RuntimeError("fake_rank needs a process without torch.distributed initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
            context_parallel_size=layout.sp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.etp,
            create_gloo_process_groups=False,
        )
        yield
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def representative_ranks(layout: Layout) -> list[int]:
    """One global rank per pipeline rank (the first of its stage)."""
    per_stage = layout.world // layout.pp
    return [p * per_stage for p in range(layout.pp)]


@dataclass
class ShardMemory:
    params: int = 0  # number of parameters on the rank
    expert_params: int = 0
    by_optimizer: dict[str, int] = field(default_factory=dict)
    optimizer: StageOptimizerMemory | None = None  # per-rank optimizer state (parallel.optimizer_memory)

    @property
    def param_bytes(self) -> int:
        return 4 * self.params

    @property
    def grad_bytes(self) -> int:
        return 4 * self.params

    @property
    def replicated_optimizer_bytes(self) -> int:
        """Optimizer state if every data-parallel replica kept all of it (the pre-sharding upper bound)."""
        return sum(OPTIMIZER_BYTES.get(k, 8) * n for k, n in self.by_optimizer.items())

    @property
    def optimizer_bytes(self) -> int:
        """Optimizer state of the stage's most loaded rank (the replicated bound when no plan is attached)."""
        return self.optimizer.max_bytes if self.optimizer is not None else self.replicated_optimizer_bytes


def shard_memory(modules: Iterable[nn.Module]) -> ShardMemory:
    out = ShardMemory()
    seen: set[int] = set()
    for m in modules:
        for name, p in m.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            out.params += n
            if is_expert_param(p):
                out.expert_params += n
            owner = optimizer_of(name, p)
            out.by_optimizer[owner] = out.by_optimizer.get(owner, 0) + n
    return out


def format_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table (also readable as text)."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: (
        "| " + " | ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    )
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"**{title}**", "", line(header), sep] + [line(r) for r in rows])
