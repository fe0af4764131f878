"""Conversion between our DeepSeek-V4 model and HuggingFace transformers' ``DeepseekV4ForCausalLM`` format.

* :func:`model_from_hf` (``hf_dir``, device, dtype): a directory written by ``save_pretrained`` (config.json +
  safetensors) -> our :class:`DeepSeekV4Model` with those weights (one process; starts a one-rank process group
  if none exists). ``model(input_ids)`` returns logits [B, S, V].
* :func:`save_hf` (model, out_dir): writes config.json + model.safetensors that
  ``DeepseekV4ForCausalLM.from_pretrained`` loads. MTP weights are saved under ``mtp.*`` (HF ignores them,
  :func:`model_from_hf` restores them).

Config mapping (ModelConfig field = HF field unless listed): ``num_layers`` = ``num_hidden_layers``,
``num_heads`` = ``num_attention_heads``, ``rope_head_dim`` = ``partial_rotary_factor · head_dim``,
``layer_types`` sliding/csa/hca = sliding_attention/compressed_sparse_attention/heavily_compressed_attention,
``compress_rate_csa|hca`` = ``compress_rates[...]``, ``n_hash_layers`` = the leading ``hash_moe`` entries of
``mlp_layer_types``, ``rope_theta`` / ``compress_rope_theta`` + ``yarn`` = ``rope_parameters["main"|"compress"]``,
``num_mtp_layers`` = ``num_nextn_predict_layers``, ``init_std`` = ``initializer_range``.

Tensor mapping (ours -> HF, ``model.`` prefix on all but ``lm_head``): the MoE is megatron's layout —
router ``mlp.layer.router.{weight, expert_bias, tid2eid}`` -> ``mlp.gate.{weight, e_score_correction_bias,
tid2eid}``; routed experts ``mlp.layer.experts.local_experts.<e>.linear_fc1|fc2.weight`` stacked into
``mlp.experts.gate_up_proj [E, 2I, d]`` (gate rows first, like our fc1) / ``down_proj [E, d, I]``; shared expert
``linear_fc1 = [gate; up]`` split into ``shared_experts.gate_proj/up_proj``, ``linear_fc2`` -> ``down_proj``.
Everything else (mHC, norms, attention, embedding, head) has the HF name already.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

LAYER_TYPE_TO_HF = {
    "sliding": "sliding_attention",
    "csa": "compressed_sparse_attention",
    "hca": "heavily_compressed_attention",
}
HF_TO_LAYER_TYPE = {v: k for k, v in LAYER_TYPE_TO_HF.items()}
V4_CONFIG_FILE = "v4_model_config.json"  # our full ModelConfig, next to HF's config.json

# tensors HF keeps in fp32 whatever the model dtype (its _keep_in_fp32_modules_strict)
_FP32_PATTERNS = re.compile(
    r"(attn_hc|ffn_hc|hc_head|sinks|position_bias|e_score_correction_bias|expert_bias|"
    r"q_a_norm|kv_norm|input_layernorm|post_attention_layernorm|(^|\.)norm\.|enorm|hnorm)"
)


# ----------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------


def hf_config_from_model_config(cfg: Any):
    """Our ``ModelConfig`` -> transformers ``DeepseekV4Config``."""
    from transformers import DeepseekV4Config

    prf = cfg.rope_head_dim / cfg.head_dim
    compress = {"rope_type": "default", "rope_theta": cfg.compress_rope_theta, "partial_rotary_factor": prf}
    if cfg.yarn.enabled:
        compress.update(
            rope_type="yarn",
            factor=cfg.yarn.factor,
            original_max_position_embeddings=cfg.yarn.original_max_position,
            beta_fast=cfg.yarn.beta_fast,
            beta_slow=cfg.yarn.beta_slow,
            attention_factor=1.0,
        )
    return DeepseekV4Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=1,
        head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts,
        scoring_func="sqrtsoftplus",
        norm_topk_prob=True,
        routed_scaling_factor=cfg.routed_scaling_factor,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        layer_types=[LAYER_TYPE_TO_HF[t] for t in cfg.layer_types],
        compress_rates={
            "compressed_sparse_attention": cfg.compress_rate_csa,
            "heavily_compressed_attention": cfg.compress_rate_hca,
        },
        compress_rope_theta=cfg.compress_rope_theta,
        hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps,
        mlp_layer_types=["hash_moe" if i < cfg.n_hash_layers else "moe" for i in range(cfg.num_layers)],
        swiglu_limit=cfg.swiglu_limit,
        sliding_window=cfg.sliding_window,
        o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank,
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        num_nextn_predict_layers=cfg.num_mtp_layers,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.init_std,
        partial_rotary_factor=prf,
        tie_word_embeddings=False,
        rope_parameters={
            "main": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": prf},
            "compress": compress,
        },
    )


def model_config_from_hf(hf_cfg: Any):
    """transformers ``DeepseekV4Config`` -> our ``ModelConfig`` (validated)."""
    from pretrain.config import ConfigError, ModelConfig, YarnConfig

    mlp = list(hf_cfg.mlp_layer_types)
    n_hash = next((i for i, t in enumerate(mlp) if t != "hash_moe"), len(mlp))
    if any(t == "hash_moe" for t in mlp[n_hash:]):
        raise ConfigError(f"mlp_layer_types {mlp}: hash_moe layers must be a prefix (the first n_hash_layers)")
    unknown = [t for t in hf_cfg.layer_types if t not in HF_TO_LAYER_TYPE]
    if unknown:
        raise ConfigError(f"layer_types {unknown} unknown; expected {sorted(HF_TO_LAYER_TYPE)}")
    rp = hf_cfg.rope_parameters
    main, comp = rp["main"], rp["compress"]
    yarn = YarnConfig(enabled=False)
    if comp.get("rope_type") == "yarn":
        yarn = YarnConfig(
            enabled=True,
            factor=float(comp["factor"]),
            original_max_position=int(comp["original_max_position_embeddings"]),
            beta_fast=float(comp.get("beta_fast", 32.0)),
            beta_slow=float(comp.get("beta_slow", 1.0)),
        )
    if hf_cfg.num_key_value_heads != 1:
        raise ConfigError(f"num_key_value_heads={hf_cfg.num_key_value_heads}: DeepSeek-V4 uses one shared K=V head")
    return ModelConfig(
        vocab_size=hf_cfg.vocab_size,
        hidden_size=hf_cfg.hidden_size,
        num_layers=hf_cfg.num_hidden_layers,
        num_heads=hf_cfg.num_attention_heads,
        head_dim=hf_cfg.head_dim,
        rope_head_dim=int(round(hf_cfg.head_dim * hf_cfg.partial_rotary_factor)),
        q_lora_rank=hf_cfg.q_lora_rank,
        o_groups=hf_cfg.o_groups,
        o_lora_rank=hf_cfg.o_lora_rank,
        sliding_window=hf_cfg.sliding_window,
        compress_rate_csa=hf_cfg.compress_rates["compressed_sparse_attention"],
        compress_rate_hca=hf_cfg.compress_rates["heavily_compressed_attention"],
        index_n_heads=hf_cfg.index_n_heads,
        index_head_dim=hf_cfg.index_head_dim,
        index_topk=hf_cfg.index_topk,
        layer_types=[HF_TO_LAYER_TYPE[t] for t in hf_cfg.layer_types],
        n_routed_experts=hf_cfg.n_routed_experts,
        n_shared_experts=hf_cfg.n_shared_experts,
        num_experts_per_tok=hf_cfg.num_experts_per_tok,
        moe_intermediate_size=hf_cfg.moe_intermediate_size,
        n_hash_layers=n_hash,
        routed_scaling_factor=hf_cfg.routed_scaling_factor,
        swiglu_limit=hf_cfg.swiglu_limit,
        hc_mult=hf_cfg.hc_mult,
        hc_sinkhorn_iters=hf_cfg.hc_sinkhorn_iters,
        hc_eps=hf_cfg.hc_eps,
        rms_norm_eps=hf_cfg.rms_norm_eps,
        num_mtp_layers=hf_cfg.num_nextn_predict_layers,
        rope_theta=float(main["rope_theta"]),
        compress_rope_theta=float(comp["rope_theta"]),
        yarn=yarn,
        max_position_embeddings=hf_cfg.max_position_embeddings,
        init_std=hf_cfg.initializer_range,
    )


# ----------------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------------

_MOE_RE = re.compile(r"^layers\.(\d+)\.mlp\.layer\.(.*)$")


def _check_single_process(model: nn.Module) -> None:
    from megatron.core import parallel_state as ps

    sizes = dict(
        tp=ps.get_tensor_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
    )
    if any(v != 1 for v in sizes.values()) or not (model.pre_process and model.post_process):
        raise RuntimeError(
            f"HF conversion needs the whole model in one process (got {sizes}); gather a "
            f"distributed checkpoint first (pretrain.model.export)"
        )


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our full model's state -> HF tensor names (MTP kept as ``mtp.*``)."""
    _check_single_process(model)
    cfg = model.cfg
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    for name, t in sd.items():
        if name.endswith("_extra_state"):  # megatron linears' (empty) extra state
            continue
        if name.startswith("mtp."):  # HF has no MTP: kept in our naming (megatron MoE layout included)
            if not name.endswith("local_tokens_per_expert"):
                out[name] = t
            continue
        m = _MOE_RE.match(name)
        if m is None:
            out[name if name.startswith("lm_head.") else f"model.{name}"] = t
            continue
        layer, rest = int(m.group(1)), m.group(2)
        pre = f"model.layers.{layer}.mlp."
        if rest == "router.weight":
            out[pre + "gate.weight"] = t
        elif rest == "router.expert_bias":
            out[pre + "gate.e_score_correction_bias"] = t
        elif rest == "router.tid2eid":
            out[pre + "gate.tid2eid"] = t
        elif rest == "shared_experts.linear_fc1.weight":
            gate, up = t.chunk(2, dim=0)
            out[pre + "shared_experts.gate_proj.weight"] = gate
            out[pre + "shared_experts.up_proj.weight"] = up
        elif rest == "shared_experts.linear_fc2.weight":
            out[pre + "shared_experts.down_proj.weight"] = t
        elif em := re.match(r"experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$", rest):
            experts.setdefault(layer, {}).setdefault(em.group(2), {})[int(em.group(1))] = t
        elif rest == "router.local_tokens_per_expert":
            continue
        else:
            raise KeyError(f"hf_state_dict: no HF name for '{name}'")
    for layer, fcs in experts.items():
        pre = f"model.layers.{layer}.mlp.experts."
        out[pre + "gate_up_proj"] = torch.stack([fcs["1"][e] for e in range(cfg.n_routed_experts)])
        out[pre + "down_proj"] = torch.stack([fcs["2"][e] for e in range(cfg.n_routed_experts)])
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def load_hf_state_dict(model: nn.Module, hf_sd: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load HF-named tensors (as written by HF or :func:`hf_state_dict`) into our model."""
    _check_single_process(model)
    cfg = model.cfg
    ours: dict[str, torch.Tensor] = {}
    for name, t in hf_sd.items():
        if name.startswith("mtp."):
            ours[name] = t
            continue
        if name == "lm_head.weight":
            ours[name] = t
            continue
        if not name.startswith("model."):
            raise KeyError(f"load_hf_state_dict: unexpected tensor '{name}' (expected model.* / lm_head / mtp.*)")
        name = name[len("model.") :]
        m = re.match(r"^layers\.(\d+)\.mlp\.(.*)$", name)
        if m is None:
            ours[name] = t
            continue
        pre = f"layers.{m.group(1)}.mlp.layer."
        rest = m.group(2)
        if rest == "gate.weight":
            ours[pre + "router.weight"] = t
        elif rest == "gate.e_score_correction_bias":
            ours[pre + "router.expert_bias"] = t
        elif rest == "gate.tid2eid":
            dup = (t.sort(dim=1).values.diff(dim=1) == 0).any(dim=1)
            if bool(dup.any()):
                raise ValueError(
                    f"load_hf_state_dict: '{name}' maps {int(dup.sum())} token ids to a repeated expert "
                    f"(e.g. token {int(dup.nonzero()[0])}: {t[dup.nonzero()[0]].tolist()}); every row "
                    f"needs {t.shape[1]} distinct experts (HF's untrained init is all zeros: fill it, "
                    f"e.g. with pretrain.model.moe.make_hash_table)"
                )
            ours[pre + "router.tid2eid"] = t
        elif rest == "experts.gate_up_proj":
            for e in range(cfg.n_routed_experts):
                ours[pre + f"experts.local_experts.{e}.linear_fc1.weight"] = t[e]
        elif rest == "experts.down_proj":
            for e in range(cfg.n_routed_experts):
                ours[pre + f"experts.local_experts.{e}.linear_fc2.weight"] = t[e]
        elif rest in ("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight"):
            continue  # joined below
        elif rest == "shared_experts.down_proj.weight":
            ours[pre + "shared_experts.linear_fc2.weight"] = t
        else:
            raise KeyError(f"load_hf_state_dict: no tensor of ours for HF '{name}'")
    for name in hf_sd:
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.shared_experts\.gate_proj\.weight$", name)
        if m:
            up = hf_sd[name.replace("gate_proj", "up_proj")]
            ours[f"layers.{m.group(1)}.mlp.layer.shared_experts.linear_fc1.weight"] = torch.cat([hf_sd[name], up])
    own = model.state_dict()
    missing = [k for k in own if k not in ours and not k.endswith(("local_tokens_per_expert", "_extra_state"))]
    if not cfg.num_mtp_layers or not any(k.startswith("mtp.") for k in ours):
        skipped = [k for k in missing if k.startswith("mtp.")]
        if skipped:
            log.info("no MTP weights in the HF checkpoint: %d MTP tensors keep their initial values", len(skipped))
        missing = [k for k in missing if not k.startswith("mtp.")]
    unexpected = [k for k in ours if k not in own]
    if strict and (missing or unexpected):
        raise KeyError(
            f"load_hf_state_dict: missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}"
        )
    with torch.no_grad():
        for k, t in ours.items():
            if k not in own:
                continue
            if own[k].shape != t.shape:
                raise ValueError(
                    f"load_hf_state_dict: '{k}' has shape {tuple(t.shape)} in the checkpoint but "
                    f"{tuple(own[k].shape)} in the model; the config does not match the weights"
                )
            own[k].copy_(t.to(own[k].dtype))


def _read_mtp_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Our ``mtp.*`` tensors from the safetensors files (HF's loader drops them)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k.startswith("mtp."):
                    out[k] = fh.get_tensor(k)
    return out


def model_from_hf(hf_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Build our model from a ``save_pretrained`` directory; returns it in eval mode on ``device``.

    The weights are read through ``DeepseekV4ForCausalLM.from_pretrained`` (so every layout HF accepts — its
    own names or the official checkpoint names its save writes — works), then mapped to our modules.
    """
    from megatron.core import parallel_state as ps
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from parallel.process_groups import init_distributed
    from pretrain.config import ParallelConfig
    from pretrain.model.transformer import DeepSeekV4Model

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise FileNotFoundError(
            f"model_from_hf: {hf_dir / 'config.json'} not found; pass the directory written "
            f"by DeepseekV4ForCausalLM.save_pretrained"
        )
    if not list(hf_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"model_from_hf: no *.safetensors in {hf_dir}; expected the output of "
            f"DeepseekV4ForCausalLM.save_pretrained (config.json + model*.safetensors)"
        )
    hf_cfg = DeepseekV4Config.from_pretrained(str(hf_dir))
    cfg = model_config_from_hf(hf_cfg)
    ours = hf_dir / V4_CONFIG_FILE
    if ours.exists():  # written by save_hf: also restores the training-only fields (MTP layer type, ...)
        from pretrain.config import ModelConfig, _build

        cfg = _build(ModelConfig, json.loads(ours.read_text()), str(ours))
    if not ps.model_parallel_is_initialized():
        init_distributed(ParallelConfig(), cfg)
    hf_model = DeepseekV4ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    sd = dict(hf_model.state_dict())
    del hf_model
    sd.update(_read_mtp_tensors(hf_dir))
    model = DeepSeekV4Model(cfg)
    load_hf_state_dict(model, sd)
    cast_model(model, dtype)
    return model.to(device).eval()


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast to ``dtype`` except the tensors V4 keeps in fp32 (norms, mHC, sinks, position biases, expert bias)."""
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if _FP32_PATTERNS.search(name) else dtype)
    return model


def save_hf(model: nn.Module, out_dir: str | Path) -> Path:
    """Write a directory that ``DeepseekV4ForCausalLM.from_pretrained`` loads (HF's own save format).

    Our tensors are assigned to an HF model built on the meta device, which HF's ``save_pretrained`` writes;
    MTP tensors are added to the same safetensors file under ``mtp.*`` (ignored by HF, restored by
    :func:`model_from_hf`), and ``v4_model_config.json`` keeps our full ModelConfig.
    """
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV4ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_cfg = hf_config_from_model_config(model.cfg)
    sd = {k: v.cpu() for k, v in hf_state_dict(model).items()}
    mtp = {k: sd.pop(k) for k in [k for k in sd if k.startswith("mtp.")]}
    with torch.device("meta"):
        hf_model = DeepseekV4ForCausalLM(hf_cfg)
    hf_model.load_state_dict(sd, strict=True, assign=True)
    hf_model.save_pretrained(str(out_dir), max_shard_size="1000GB")
    if mtp:
        files = sorted(out_dir.glob("*.safetensors"))
        if len(files) != 1:
            raise RuntimeError(f"save_hf: expected one safetensors file in {out_dir}, found {files}")
        merged = load_file(str(files[0]))
        merged.update({k: v.contiguous() for k, v in mtp.items()})
        save_file(merged, str(files[0]), metadata={"format": "pt"})
    (out_dir / V4_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.cfg), indent=1))
    return out_dir
