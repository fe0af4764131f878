"""The DeepSeek-V4 model: blocks of [mHC(attention), mHC(MoE)] on n residual streams (docs/MODEL.md §2).

    e      = Emb(input_ids)                                  [B, S, d]   (megatron VocabParallelEmbedding)
    X⁰[j]  = e  for j = 1..n                                 [B, S, n, d]
    for l:   (x, post, comb) = mHC_attn.pre(X);  X = mHC_attn.post(Attn_l(RMSNorm(x)), X, post, comb)
             (x, post, comb) = mHC_ffn.pre(X);   X = mHC_ffn.post(MoE_l(RMSNorm(x), ids), X, post, comb)
    h      = RMSNorm(hc_head(X^L));  logits = h W_headᵀ                  (megatron ColumnParallelLinear, untied;
             the training loss takes h and W_head through ops.linear_cross_entropy, never the [B, S, V] logits)
    MTP    : depth-1 module on X^L and Emb(t_{i+1}) predicting t_{i+2} (pretrain.model.mtp)

Loss (``forward`` with ``labels``): loss = L_LM + λ·L_MTP + L_bal + c_I·L_indexer, with L_LM / L_MTP token-mean
cross-entropies (label −100 ignored), L_bal the sum of the learned routers' sequence-wise balance losses
(already × α) and L_indexer the sum of the CSA layers' indexer KL losses (c_I = ``indexer_loss_coeff``).

Pipeline stages: ``DeepSeekV4Model(cfg, pre_process, post_process, layer_range=(lo, hi))`` builds layers
[lo, hi) only; the embedding lives on the first stage (``pre_process``), hc_head / norm / head / MTP on the last
(``post_process``). What flows between stages is the stream state X [B, S, n, d] (``set_input_tensor`` /
``hidden_streams``); a non-last stage returns it. Layers keep their global index in parameter names
(``layers.<l>.…``), so state dicts of stages merge into the single-stage one. When the last stage is not the
first, it owns its own copy of the embedding for the MTP input (``mtp_embed_tokens``, attribute
``shared_embedding=True``): the pipeline code must keep it equal to the first stage's (sum their gradients).
Auxiliary losses of a stage (balance, indexer) are in ``stage_aux_loss`` after each forward for the pipeline
code to attach to the stage output.

Activation recomputation (``cfg.recompute`` = none | selective | full, ``cfg.recompute_num_layers``;
:mod:`pretrain.model.recompute`): ``full`` checkpoints each :class:`V4Block` (it keeps only its input X),
``selective`` the core attention (``V4Attention._core_attention``) and both mHC ``pre`` sites; N > 0 limits it
to the first N blocks of this stage (the MTP block then keeps everything). Same results and gradients; the
router load counters and the per-forward losses are restored after each recompute, so nothing counts twice.

Parameters carry only structural metadata (docs/CONTRACTS.md): experts ``v4_expert``, fused fc1 ``v4_blocks``
(pretrain.model.moe), the grouped ``o_a_proj`` ``v4_blocks``/``v4_tp_whole_blocks``. Which optimizer owns a
parameter is decided by its name in ``parallel.optimizer_groups.OPTIMIZER_ROUTES``.
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from typing import Any, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from torch import nn

from ops import functional as op
from ops.linear_cross_entropy import IGNORE_INDEX
from pretrain.model import recompute
from pretrain.model.attention import V4Attention
from pretrain.model.mhc import HyperConnection, HyperHead, expand_streams
from pretrain.model.moe import V4MoE, megatron_moe_config
from pretrain.model.mtp import MTPModule
from pretrain.model.rmsnorm import RMSNorm

log = logging.getLogger(__name__)


class V4Block(nn.Module):
    """One block: X [B, S, n, d] -> X, with its own mHC sites around attention and MoE (HF names)."""

    def __init__(
        self,
        cfg: Any,
        layer_idx: int,
        layer_type: str,
        moe_config: Any,
        balance_loss_coeff: float,
        is_mtp: bool = False,
        recompute_mode: str = "none",
    ):
        super().__init__()
        mhc = partial(
            HyperConnection,
            cfg.hidden_size,
            cfg.hc_mult,
            cfg.hc_sinkhorn_iters,
            cfg.hc_eps,
            cfg.rms_norm_eps,
            cfg.hc_init_gating,
        )
        self.layer_idx, self.layer_type = layer_idx, layer_type
        self.attn_hc = mhc()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = V4Attention(cfg, layer_type, layer_idx)
        self.ffn_hc = mhc()
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        is_hash = (not is_mtp) and layer_idx < cfg.n_hash_layers
        self.mlp = V4MoE(cfg, layer_idx + 1, is_hash, moe_config, balance_loss_coeff, is_mtp_layer=is_mtp)
        # activation recomputation of this block: none | selective | full (pretrain.model.recompute)
        self.recompute = recompute.check_mode(recompute_mode)
        self.self_attn.recompute_core = recompute_mode == "selective"

    def forward(
        self, x: torch.Tensor, input_ids: Optional[torch.Tensor], doc_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.recompute == "full":
            return recompute.checkpoint(self._forward, x, input_ids, doc_ids, state_of=self)
        return self._forward(x, input_ids, doc_ids)

    def _hc_pre(self, hc: HyperConnection, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.recompute == "selective":  # projection, gates and Sinkhorn recomputed from X
            return recompute.checkpoint(hc.pre, x)
        return hc.pre(x)

    def _forward(
        self, x: torch.Tensor, input_ids: Optional[torch.Tensor], doc_ids: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x_in, post, comb = self._hc_pre(self.attn_hc, x)
        out = self.self_attn(self.input_layernorm(x_in), doc_ids=doc_ids)
        indexer_loss = self.self_attn.indexer_loss
        x = self.attn_hc.post(out, x, post, comb)
        x_in, post, comb = self._hc_pre(self.ffn_hc, x)
        x = self.ffn_hc.post(self.mlp(self.post_attention_layernorm(x_in), input_ids), x, post, comb)
        return x, indexer_loss


def _layer_slice(cfg: Any, layer_range: Optional[tuple[int, int]]) -> range:
    if layer_range is None:
        return range(cfg.num_layers)
    lo, hi = layer_range
    if not 0 <= lo <= hi <= cfg.num_layers:
        raise ValueError(f"layer_range {layer_range} must satisfy 0 <= lo <= hi <= num_layers={cfg.num_layers}")
    return range(lo, hi)


class DeepSeekV4Model(nn.Module):
    """DeepSeek-V4 (or one pipeline stage of it). See the module docstring for the forward contract."""

    def __init__(
        self,
        cfg: Any,
        pre_process: bool = True,
        post_process: bool = True,
        layer_range: Optional[tuple[int, int]] = None,
        balance_loss_coeff: float = 1e-4,
        params_dtype: torch.dtype = torch.float32,
        bias_update_rate: float = 1e-3,
    ):
        super().__init__()
        if not ps.model_parallel_is_initialized():
            raise RuntimeError(
                "DeepSeekV4Model needs megatron's parallel state: call "
                "parallel.process_groups.init_distributed(ParallelConfig(), cfg) first"
            )
        self.cfg = cfg
        self.pre_process, self.post_process = pre_process, post_process
        self.moe_config = megatron_moe_config(cfg, params_dtype, bias_update_rate)
        init = partial(nn.init.normal_, mean=0.0, std=cfg.init_std)
        self.input_tensor: Optional[torch.Tensor] = None
        self.stage_aux_loss: Optional[torch.Tensor] = None

        if pre_process:
            self.embed_tokens = tensor_parallel.VocabParallelEmbedding(
                cfg.vocab_size, cfg.hidden_size, init_method=init, config=self.moe_config
            )
        mode, n_rc = getattr(cfg, "recompute", "none"), getattr(cfg, "recompute_num_layers", 0)
        self.layers = nn.ModuleDict(
            {  # recompute_num_layers > 0: only the first N blocks of this chunk
                str(i): V4Block(
                    cfg,
                    i,
                    cfg.layer_types[i],
                    self.moe_config,
                    balance_loss_coeff,
                    recompute_mode=mode if not n_rc or k < n_rc else "none",
                )
                for k, i in enumerate(_layer_slice(cfg, layer_range))
            }
        )
        if post_process:
            self.hc_head = HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps, cfg.hc_init_gating)
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            head_cfg = copy.copy(self.moe_config)
            head_cfg.sequence_parallel = False  # activations are replicated over TP outside the MoE
            self.lm_head = tensor_parallel.ColumnParallelLinear(
                cfg.hidden_size, cfg.vocab_size, config=head_cfg, init_method=init, bias=False, gather_output=False
            )
            self.mtp = None
            if cfg.num_mtp_layers > 0:
                if cfg.num_mtp_layers != 1:
                    raise ValueError(f"num_mtp_layers={cfg.num_mtp_layers}: only MTP depth 1 is implemented (V4)")
                block = V4Block(
                    cfg,
                    cfg.num_layers,
                    cfg.mtp_layer_type,
                    self.moe_config,
                    balance_loss_coeff,
                    is_mtp=True,
                    recompute_mode="none" if n_rc else mode,
                )
                self.mtp = MTPModule(cfg, block)
                if not pre_process:
                    self.mtp_embed_tokens = tensor_parallel.VocabParallelEmbedding(
                        cfg.vocab_size, cfg.hidden_size, init_method=init, config=self.moe_config
                    )
                    self.mtp_embed_tokens.weight.shared_embedding = True
        modes = {name: blk.recompute for name, blk in self.named_modules() if isinstance(blk, V4Block)}
        if any(m != "none" for m in modes.values()):
            log.info("activation recomputation: %s", ", ".join(f"{n}={m}" for n, m in modes.items()))

    # ------------------------------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor: Any) -> None:
        """megatron pipeline hook: the stream state X [B, S, n, d] received from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def _embedding(self) -> nn.Module:
        return self.embed_tokens if self.pre_process else self.mtp_embed_tokens

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        logits, _ = self.lm_head(h)
        return logits

    def _head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token-mean CE of the head's logits over labels != −100. TP = 1: one ``linear_cross_entropy`` op (the
        CPU/blocked backend never holds the [B, S, V] logits); TP > 1: megatron's vocab-parallel loss."""
        if ps.get_tensor_model_parallel_world_size() > 1:
            return self._vocab_parallel_cross_entropy(self._head(h), labels)
        per_sum = op.linear_cross_entropy(
            h.flatten(0, 1), weight=self.lm_head.weight, labels=labels.flatten(), ignore_index=IGNORE_INDEX
        )
        return per_sum / self._token_count(labels)

    @staticmethod
    def _token_count(labels: torch.Tensor) -> torch.Tensor:
        """N of the token mean: this rank's labels != −100, or under Ulysses sp the global count / sp (the mean
        over the sp ranks of Σ_local / (N_global / sp) is then the one-process mean)."""
        valid = labels != IGNORE_INDEX
        from parallel import sequence_parallel as usp

        sp, _ = usp.sp_size_rank()
        if sp > 1:
            return usp.global_count(valid.sum()).clamp(min=1).to(torch.float32) / sp
        return valid.sum().clamp(min=1)

    @classmethod
    def _vocab_parallel_cross_entropy(cls, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token-mean CE over labels != −100 of logits sharded over the vocabulary (TP > 1; megatron's)."""
        valid = labels != IGNORE_INDEX
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.clamp(min=0))
        return (per_token * valid).sum() / cls._token_count(labels)

    def routers(self) -> list[tuple[str, nn.Module]]:
        """(name, router) of every MoE layer of this stage, MTP included (loads: ``router.tokens_per_expert``)."""
        from pretrain.model.moe import iter_routers

        return list(iter_routers(self))

    # ------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        doc_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        mtp_labels: Optional[torch.Tensor] = None,
        mtp_lambda: float = 0.3,
        hidden_streams: Optional[torch.Tensor] = None,
    ):
        """input_ids [B, S] -> logits [B, S, V] (labels None), else the loss dict; a non-last stage returns X."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
        if doc_ids is not None and doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        for _, router in self.routers():
            router.balance_loss = None
        from parallel import sequence_parallel as usp

        if doc_ids is not None and usp.sp_group() is not None:
            doc_ids = usp.gather_seq(doc_ids)  # Ulysses: tokens are this rank's shard, documents global
        if self.pre_process:
            x = expand_streams(self.embed_tokens(input_ids), self.cfg.hc_mult)
        else:
            x = hidden_streams if hidden_streams is not None else self.input_tensor
            if x is None:
                raise RuntimeError("non-first pipeline stage: pass hidden_streams or call set_input_tensor first")
        indexer_losses = []
        for block in self.layers.values():
            x, il = block(x, input_ids, doc_ids)
            if il is not None:
                indexer_losses.append(il)
        training_loss = labels is not None
        if not self.post_process:
            self.stage_aux_loss = self._aux_losses(indexer_losses)[2] if training_loss else None
            return x

        h = self.norm(self.hc_head(x))
        if not training_loss:
            logits = self._head(h)
            if ps.get_tensor_model_parallel_world_size() > 1:
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            return logits

        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
        lm_loss = self._head_loss(h, labels)
        mtp_loss = torch.zeros((), device=h.device)
        if self.mtp is not None and mtp_labels is not None:
            if mtp_labels.shape != input_ids.shape:
                raise ValueError(f"mtp_labels {tuple(mtp_labels.shape)} must match input_ids {tuple(input_ids.shape)}")
            # t_{i+1}: input_ids shifted left; the last position's next token is labels[:, -1]
            next_ids = torch.cat([input_ids[:, 1:], labels[:, -1:].clamp(min=0)], dim=1)
            h_mtp, il = self.mtp(x, self._embedding()(next_ids), next_ids, doc_ids)
            if il is not None:
                indexer_losses.append(il)
            mtp_loss = self._head_loss(h_mtp, mtp_labels)
        balance, indexer, aux = self._aux_losses(indexer_losses)
        self.stage_aux_loss = aux
        loss = lm_loss + mtp_lambda * mtp_loss + aux
        return {
            "loss": loss,
            "lm_loss": lm_loss,
            "mtp_loss": mtp_loss,
            "balance_loss": balance,
            "indexer_loss": indexer,
        }

    def _aux_losses(self, indexer_losses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Σ balance losses, Σ indexer losses, balance + indexer_loss_coeff · indexer) of this stage."""
        zero = torch.zeros(())
        balance = sum((r.balance_loss for _, r in self.routers() if r.balance_loss is not None), zero)
        indexer = sum(indexer_losses, zero)
        return balance, indexer, balance + self.cfg.indexer_loss_coeff * indexer
