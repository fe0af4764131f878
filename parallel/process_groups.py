"""Initialise torch.distributed and megatron-core's ``parallel_state`` from the ``parallel`` config.

``init_distributed(pcfg, model_cfg)`` reads the launcher's environment (torchrun: RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_ADDR/MASTER_PORT; Slurm srun: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID plus MASTER_ADDR/
MASTER_PORT exported by our sbatch template), picks NCCL on GPU and gloo on CPU, validates the layout
*before* any group is created, and calls ``parallel_state.initialize_model_parallel``.
With no launcher environment it starts a one-rank group on a free local port.

Layout (megatron-core order ``tp-cp-ep-dp-pp``): world = tp * pp * sp * dp, where the Ulysses degree ``sp``
occupies megatron's context-parallel slot. Experts: ep * etp must divide tp * sp * dp.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message names the numbers and the fix."""


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    vpp: int
    ep: int
    etp: int
    sp: int
    dp: int

    @property
    def expert_dp(self) -> int:
        return self.world // (self.pp * self.ep * self.etp)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compute_layout(
    world: int,
    tp: int = 1,
    pp: int = 1,
    vpp: int = 1,
    ep: int = 1,
    etp: int = 1,
    sp: int = 1,
    model: Any = None,
    pp_layer_split: Optional[list[int]] = None,
    backend: Optional[str] = None,
) -> Layout:
    """Validate a layout for ``world`` ranks (and a model config, if given); return the derived sizes.

    Every check raises :class:`LayoutError` naming the numbers, before any process group exists:
    world = tp·pp·sp·dp; ep·etp | world/pp; heads, output groups, vocabulary divisible by tp; heads by tp·sp
    (Ulysses); experts by ep; expert width by etp, shared-expert width by tp; layers by pp·vpp (or a
    ``pp_layer_split`` of pp·vpp non-negative entries summing to the layers); vpp needs pp > 1; etp > 1
    needs NCCL.
    """
    for name, v in dict(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, sp=sp).items():
        if v < 1:
            raise LayoutError(f"parallel.{name}={v} must be >= 1")
    denom = tp * pp * sp
    if world % denom:
        raise LayoutError(
            f"world size {world} is not divisible by tp*pp*sp = {tp}*{pp}*{sp} = {denom}; "
            f"choose sizes whose product divides {world}"
        )
    dp = world // denom
    if (world // pp) % (ep * etp):
        raise LayoutError(
            f"ep*etp = {ep}*{etp} = {ep * etp} must divide world/pp = {world // pp} (world {world}, pp {pp})"
        )
    if vpp > 1 and pp == 1:
        raise LayoutError(f"parallel.vpp={vpp} needs pipeline parallelism (pp > 1)")
    if etp > 1 and backend == "gloo":
        raise LayoutError(
            f"parallel.etp={etp} needs NCCL: gloo has no uneven all_gather for the expert-tensor-"
            f"parallel token dispatch (docs/STACK.md §3); use parallel.etp=1 on CPU"
        )
    if model is not None:
        if model.num_heads % tp:
            raise LayoutError(f"model.num_heads={model.num_heads} is not divisible by parallel.tp={tp}")
        if model.o_groups % tp:
            raise LayoutError(
                f"model.o_groups={model.o_groups} is not divisible by parallel.tp={tp} "
                f"(the grouped output projection is split by groups)"
            )
        if model.n_routed_experts % ep:
            raise LayoutError(f"model.n_routed_experts={model.n_routed_experts} is not divisible by parallel.ep={ep}")
        if model.vocab_size % tp:
            raise LayoutError(
                f"model.vocab_size={model.vocab_size} is not divisible by parallel.tp={tp} "
                f"(vocabulary-parallel embedding and head)"
            )
        if model.num_heads % (tp * sp):
            raise LayoutError(
                f"model.num_heads={model.num_heads} is not divisible by tp*sp={tp * sp} "
                f"(Ulysses splits the local heads across sp ranks)"
            )
        inter = getattr(model, "moe_intermediate_size", 0)
        if inter % etp:
            raise LayoutError(
                f"model.moe_intermediate_size={inter} is not divisible by "
                f"parallel.etp={etp} (expert tensor parallelism splits the expert FFN width)"
            )
        shared = inter * getattr(model, "n_shared_experts", 0)
        if shared % tp:
            raise LayoutError(
                f"shared-expert width n_shared_experts*moe_intermediate_size = {shared} is not "
                f"divisible by parallel.tp={tp}"
            )
        stages = pp * vpp
        if pp_layer_split:
            if len(pp_layer_split) != stages:
                raise LayoutError(f"parallel.pp_layer_split has {len(pp_layer_split)} entries; need pp*vpp = {stages}")
            if sum(pp_layer_split) != model.num_layers or min(pp_layer_split) < 0:
                raise LayoutError(
                    f"parallel.pp_layer_split {pp_layer_split} sums to "
                    f"{sum(pp_layer_split)}, model.num_layers={model.num_layers}"
                )
        elif model.num_layers % stages:
            raise LayoutError(
                f"model.num_layers={model.num_layers} is not divisible by pp*vpp = {stages}; "
                f"give parallel.pp_layer_split explicitly"
            )
    return Layout(world=world, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, sp=sp, dp=dp)


def validate_batch(layout: Layout, global_batch: int, micro_batch: int, seq_len: int, model: Any = None) -> int:
    """Check the batch shape against a layout; return the number of micro-batches per data-parallel rank.

    global_batch = micro_batch · dp · M; the interleaved schedule (vpp > 1) needs M divisible by pp; the MoE's
    sequence chunks under TP need seq_len divisible by tp, Ulysses by sp (and each sp shard by tp)."""
    per = micro_batch * layout.dp
    if global_batch % per:
        raise LayoutError(
            f"train.global_batch={global_batch} is not divisible by micro_batch*dp = {micro_batch}*{layout.dp} = {per}"
        )
    m = global_batch // per
    if layout.vpp > 1 and m % layout.pp:
        raise LayoutError(
            f"interleaved pipeline (vpp={layout.vpp}): {m} micro-batches per data-parallel rank "
            f"(global_batch {global_batch} / (micro_batch {micro_batch} * dp {layout.dp})) must be "
            f"divisible by pp={layout.pp}"
        )
    if seq_len % (layout.sp * layout.tp):
        raise LayoutError(
            f"train.seq_len={seq_len} is not divisible by sp*tp = {layout.sp}*{layout.tp} "
            f"(Ulysses shards the sequence over sp, the MoE chunks each shard over tp)"
        )
    return m


def global_rank() -> int:
    """This process's rank in the default process group; 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_initialized() else 0


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or Slurm variables; (0, 1, 0) when absent."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def pick_backend(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_torch_distributed(backend: str = "auto", timeout_minutes: int = 30) -> tuple[int, int]:
    """Start the default process group if none exists. Returns (rank, world)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world, local_rank = launcher_env()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise LayoutError(
                "MASTER_PORT is not set for a multi-rank run; launch with torchrun or srun "
                "through clusters/slurm (which exports it)"
            )
        os.environ["MASTER_PORT"] = str(free_port())
    be = pick_backend(backend)
    if be == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=be, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout_minutes)
    )
    return rank, world


def megatron_cpu_flags() -> dict[str, Any]:
    """TransformerConfig flags needed without CUDA/apex/TE (docs/STACK.md §1)."""
    return dict(
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        batch_p2p_comm=False,
        pipeline_dtype=torch.float32,
    )


def init_distributed(pcfg: Any, model_cfg: Any = None) -> Layout:
    """Initialise torch.distributed + megatron ``parallel_state`` for ``pcfg`` (a ParallelConfig).

    Validates first (no group is created for a bad layout), applies the CPU compatibility layer when
    CUDA is absent, and returns the derived :class:`Layout`.
    """
    _, world_env, _ = launcher_env()
    world = dist.get_world_size() if dist.is_initialized() else world_env
    layout = compute_layout(
        world,
        pcfg.tp,
        pcfg.pp,
        pcfg.vpp,
        pcfg.ep,
        pcfg.etp,
        pcfg.sp,
        model=model_cfg,
        pp_layer_split=list(getattr(pcfg, "pp_layer_split", []) or []),
        backend=pick_backend(getattr(pcfg, "backend", "auto")),
    )
    from parallel import cpu_compat

    cpu_compat.apply()
    init_torch_distributed(getattr(pcfg, "backend", "auto"), getattr(pcfg, "timeout_minutes", 30))
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.sp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    log.info("initialised %s on %d ranks (backend %s)", layout, world, dist.get_backend())
    return layout


def teardown(barrier: bool = True) -> None:
    """Destroy megatron's groups and the default process group (idempotent). ``barrier=False`` after an
    error: a peer blocked in a collective or a pipeline receive would never reach the barrier, and this
    rank's traceback would wait for the process-group timeout before anyone sees it."""
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    except ImportError:
        pass
    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        except Exception:  # a failing peer must not block teardown
            pass
        dist.destroy_process_group()
