"""Build DeepSeek-V4 for the current parallel layout: the trainer's one call.

    chunks = build_model(cfg.model, seed=cfg.train.seed, pp_layer_split=cfg.parallel.pp_layer_split,
                         balance_loss_coeff=cfg.train.seq_aux_loss_coeff,
                         bias_update_rate=cfg.train.bias_update_rate)
    # per step, with this data-parallel rank's micro-batches (pretrain.step_utils.split_batch):
    parallel.pipeline.zero_grads(chunks)
    losses = parallel.pipeline.forward_backward(chunks, microbatches, mtp_lambda)   # global-batch means
    parallel.pipeline.finalize_grads(chunks)                                        # p.grad = reduced grad
    optimizer.step(); parallel.pipeline.update_expert_bias(chunks, rate)

``build_model`` returns one module per virtual pipeline stage of this rank (``DeepSeekV4Model`` stages in
``parallel.pipeline.PipelineStage`` in megatron DDP), initialised layout-independently from ``seed``
(:mod:`parallel.init_seed`): the same seed gives the same full model under any tp/pp/vpp/ep/etp.
V4's init rule: mHC projections (``*.fn``, ``hc_head.hc_fn``) Xavier-uniform over the full shape; every other
randomly initialised tensor N(0, init_std²); constant-initialised tensors (norm weights, sinks, position
biases, mHC biases and gates) unchanged. The last stage's MTP copy of the embedding starts equal to the
embedding (alias ``mtp_embed_tokens.weight`` → ``embed_tokens.weight``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from parallel import init_seed, pipeline

V4_ALIASES = {"mtp_embed_tokens.weight": "embed_tokens.weight"}


def _xavier(name: str) -> bool:
    return name.endswith((".fn", ".hc_fn"))


def v4_init_rule(cfg: Any) -> init_seed.Rule:
    return init_seed.normal_rule(cfg.init_std, xavier=_xavier)


def init_v4_(modules: Sequence[nn.Module], cfg: Any, seed: int) -> int:
    """Layout-independent init of this rank's V4 stage modules (current megatron parallel state)."""
    return init_seed.init_layout_independent_(
        modules, seed, v4_init_rule(cfg), aliases=V4_ALIASES, num_experts=cfg.n_routed_experts
    )


def build_model(
    cfg: Any,
    seed: int,
    pp_layer_split: Sequence[int] | None = None,
    balance_loss_coeff: float = 1e-4,
    bias_update_rate: float = 1e-3,
    params_dtype: torch.dtype = torch.float32,
    wrap_ddp: bool = True,
    ddp_config: Any = None,
) -> list[nn.Module]:
    """This rank's model chunks for the layout in megatron's ``parallel_state`` (see the module docstring)."""
    from pretrain.model.transformer import DeepSeekV4Model

    def provider(pre_process: bool, post_process: bool, layer_range: tuple[int, int], vp_stage: int) -> nn.Module:
        return DeepSeekV4Model(
            cfg,
            pre_process=pre_process,
            post_process=post_process,
            layer_range=layer_range,
            balance_loss_coeff=balance_loss_coeff,
            params_dtype=params_dtype,
            bias_update_rate=bias_update_rate,
        )

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None

    def init(modules: list[nn.Module]) -> None:
        for m in modules:
            if device is not None:
                m.to(device)
        init_v4_(modules, cfg, seed)

    return pipeline.build_model_chunks(
        provider, cfg.num_layers, cfg.hc_mult, pp_layer_split, init=init, wrap_ddp=wrap_ddp, ddp_config=ddp_config
    )
