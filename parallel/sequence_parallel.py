"""Ulysses sequence parallelism (long context) for DeepSeek-V4's attention, on megatron's context-parallel group.

The sequence of every micro-batch is cut into ``sp`` contiguous shards; rank r of the sp group holds tokens
[r·S/sp, (r+1)·S/sp) everywhere except inside the attention core (embedding, mHC, norms, projections, MoE,
head and loss all work per token). Inside a V4 attention layer (``pretrain.model.attention``):

* queries: computed for the local tokens [B, S/sp, h, c], then DeepSpeed's Ulysses all-to-all
  (``deepspeed.sequence.layer._SeqAllToAll``, scatter heads / gather sequence) gives every rank ALL S queries
  of h/sp heads; the attention output goes back with the inverse all-to-all;
* the single K=V head (one head cannot be split over heads) and the hidden states feeding the compressors are
  all-gathered along the sequence (:func:`gather_seq`; backward: reduce-scatter), so every rank sees the whole
  causal prefix: its window keys and every compressed entry (CSA/HCA blocks may straddle shard boundaries;
  they are pooled from the gathered sequence with each document's own block grid);
* the lightning indexer scores the LOCAL queries against the full set of compressed keys and takes their
  top-k over the full sequence; the selected indices are all-gathered (integers, no gradient) for the
  head-parallel attention; its KL target (attention mass summed over all heads) is computed for the local
  queries from every head's q and lse, brought back by the inverse all-to-all (no [S, N] mass is exchanged);
* document masks: positions, segment starts and the compressed-entry visibility are computed from the
  all-gathered ``doc_ids`` of the whole sequence, exactly as in one process.

:class:`SequenceShard` bundles these steps for the attention layer, each the identity at sp = 1, so the layer
has one forward for every sp.

Losses: each sp rank reports a loss whose mean over the sp group is the full-sequence loss (token means use
the global token count: loss_r = Σ_local / (N_global / sp)); megatron's DDP averages gradients over
data × context parallel, so the gradient equals one process's. Exactness: the same terms are computed; only
reduction orders differ (fp32 rounding).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sp_group() -> dist.ProcessGroup | None:
    """megatron's context-parallel group (Ulysses uses that slot), or None when sp = 1 / no parallel state."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_context_parallel_world_size() == 1:
        return None
    return ps.get_context_parallel_group()


def sp_size_rank() -> tuple[int, int]:
    g = sp_group()
    return (1, 0) if g is None else (dist.get_world_size(g), dist.get_rank(g))


def shard(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This sp rank's contiguous shard of ``t`` along ``dim`` (no communication)."""
    size, rank = sp_size_rank()
    if size == 1:
        return t
    if t.shape[dim] % size:
        raise ValueError(f"sequence length {t.shape[dim]} is not divisible by parallel.sp={size}")
    return t.chunk(size, dim=dim)[rank]


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 1; backward: sum over ranks of the full gradient, then this rank's shard."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(size, dim=1)[rank].contiguous(), None


def gather_seq(x: torch.Tensor) -> torch.Tensor:
    """[B, S/sp, ...] -> [B, S, ...] (differentiable; integer tensors too, without gradient)."""
    g = sp_group()
    if g is None:
        return x
    if not x.is_floating_point():
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(g))]
        dist.all_gather(parts, x.contiguous(), group=g)
        return torch.cat(parts, dim=1)
    return _GatherSeq.apply(x, g)


@torch.no_grad()
def reduce_scatter_seq(x: torch.Tensor) -> torch.Tensor:
    """[B, S, ...] partial sums on every rank -> [B, S/sp, ...] totals of this rank's shard (no gradient)."""
    g = sp_group()
    if g is None:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=g)
    return shard(x)


def _deepspeed_comm() -> None:
    """DeepSpeed's collectives need its comm backend; wrap the existing torch.distributed group once.
    (On CPU its first initialisation JIT-builds a shared-memory op, ~30 s, cached in TORCH_EXTENSIONS_DIR.)"""
    import deepspeed.comm as dscomm

    if not dscomm.is_initialized():
        dscomm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, dist_init_required=False)


def heads_to_seq(q: torch.Tensor) -> torch.Tensor:
    """Ulysses: [B, S/sp, h, c] -> [B, S, h/sp, c] (rank r gets heads [r·h/sp, (r+1)·h/sp))."""
    g = sp_group()
    if g is None:
        return q
    from deepspeed.sequence.layer import _SeqAllToAll

    _deepspeed_comm()
    return _SeqAllToAll.apply(g, q.contiguous(), 2, 1, 0)


def seq_to_heads(o: torch.Tensor) -> torch.Tensor:
    """Inverse Ulysses all-to-all: [B, S, h/sp, c] -> [B, S/sp, h, c]."""
    g = sp_group()
    if g is None:
        return o
    from deepspeed.sequence.layer import _SeqAllToAll

    _deepspeed_comm()
    return _SeqAllToAll.apply(g, o.contiguous(), 1, 2, 0)


def global_count(n_local: torch.Tensor) -> torch.Tensor:
    """Σ over the sp group of a local count (no gradient)."""
    g = sp_group()
    if g is None:
        return n_local
    n = n_local.detach().clone()
    dist.all_reduce(n, group=g)
    return n


class SequenceShard:
    """This rank's shard of the sequence and the Ulysses exchanges one attention layer makes on it, each the
    identity at sp = 1 (so the attention has one forward for every sp; ``pretrain.model.attention``).

    With S the whole sequence and S_l = S / sp the local tokens [r·S_l, (r+1)·S_l):

    * :meth:`gather`: [B, S_l, ...] -> [B, S, ...] (the K=V head, the compressor input, the selected indices);
    * :meth:`local`: [B, S, ...] -> [B, S_l, ...], the local positions of a whole-sequence tensor;
    * :meth:`local_heads`: [h, ...] -> [h/sp, ...], the heads rank r attends after the all-to-all (the sinks);
    * :meth:`heads_to_seq` / :meth:`seq_to_heads`: the Ulysses all-to-alls of q and o;
    * :meth:`local_queries`: q [B, S, h/sp, c] and lse [B, S, h/sp] back to every head of the local queries
      (no gradient: the indexer's KL target);
    * :meth:`global_mean`: a mean over the local qualifying queries rescaled, kl_r = kl · n_local · sp / n_global,
      so that the mean over the sp ranks is the one-process mean over all of them.
    """

    def __init__(self, size: int = 1, rank: int = 0):
        self.size, self.rank = size, rank

    @classmethod
    def current(cls) -> "SequenceShard":
        """The shard of this process (sp = 1 without megatron's context-parallel group)."""
        return cls(*sp_size_rank())

    @property
    def active(self) -> bool:
        return self.size > 1

    def _part(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim] // self.size
        return t.narrow(dim, self.rank * n, n)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return gather_seq(t) if self.active else t

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return self._part(t, 1) if self.active else t

    def local_heads(self, t: torch.Tensor) -> torch.Tensor:
        return self._part(t, 0) if self.active else t

    def heads_to_seq(self, q: torch.Tensor) -> torch.Tensor:
        return heads_to_seq(q) if self.active else q

    def seq_to_heads(self, o: torch.Tensor) -> torch.Tensor:
        return seq_to_heads(o) if self.active else o

    def local_queries(self, q: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active:
            return q, lse
        with torch.no_grad():
            return seq_to_heads(q.detach()), seq_to_heads(lse.detach()[..., None]).squeeze(-1)

    def global_mean(self, mean_local: torch.Tensor, n_local: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return mean_local
        n_global = global_count(n_local)
        return mean_local * (n_local.to(mean_local.dtype) * self.size / n_global.clamp(min=1).to(mean_local.dtype))
