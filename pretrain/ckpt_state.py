"""What goes into a checkpoint, as megatron-core sharded state dicts (see ``pretrain.checkpoint``).

- model: ``model.sharded_state_dict()`` (parameters and persistent buffers such as the routers'
  ``expert_bias``); megatron's ShardedTensors make TP/PP/EP/DP resharding work on load.
- optimizers (Muon and AdamW, any ``torch.optim.Optimizer``): every per-parameter state tensor with the
  parameter's shape becomes a ShardedTensor keyed ``optimizer.<name>.<state_key>.<param key>`` with the
  parameter's sharding, so it reshards like the parameter. Scalar per-parameter states (AdamW's ``step``)
  become one-element tensors replicated like the parameter (main replica: the rank holding the parameter's
  first shard). The list of state keys per optimizer goes into the common state so that a fresh optimizer
  can build the tensors to load into.
- optimizers that shard their own state over data parallel (``parallel.muon.Muon``: momentum on unit owners;
  ``parallel.zero_adamw.ZeroAdamW``: AdamW cells on their owners) provide ``sharded_state_dict`` and
  ``load_sharded_state``. ZeroAdamW writes the same keys as the replicated
  format above (its cells are row blocks of them), so AdamW checkpoints load either way. Muon writes one tensor
  per unit (its full matrix; only owners write, nothing is gathered) and records its format in the optimizer
  keys (``checkpoint_state_keys``); a checkpoint without it is refused with an error naming the format.
- per-rank state (RNG streams, data-loader position): a ShardedObject per global rank. These only load
  back into the same world size; with another layout the trainer reseeds the RNGs and takes the data-loader
  state of old rank 0 (the loader state is global: samples consumed so far).
"""

from __future__ import annotations

import dataclasses
import pickle
import random
from typing import Any

import numpy as np
import torch
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
)

from parallel.param_meta import is_expert_param

RNG_KEY = "rank_rng"
LOADER_KEY = "rank_loader"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip megatron's DDP / Float16Module wrappers and parallel.pipeline's PipelineStage."""
    while type(model).__name__ in ("DistributedDataParallel", "Float16Module", "DDP", "PipelineStage"):
        model = model.module
    return model


def _modules(model: Any) -> list[torch.nn.Module]:
    return [unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]


def model_sharded_state_dict(model: Any) -> dict[str, Any]:
    """ShardedTensors of a model or of a list of pipeline chunks (``{"chunk<i>": ...}``): each module's own
    ``sharded_state_dict()`` when it has one, else :func:`module_sharded_state_dict`."""
    out = {}
    for i, m in enumerate(_modules(model)):
        out[f"chunk{i}"] = m.sharded_state_dict() if hasattr(m, "sharded_state_dict") else module_sharded_state_dict(m)
    return out


def module_sharded_state_dict(module: torch.nn.Module, prefix: str = "") -> dict[str, Any]:
    """Sharded state dict of a plain ``nn.Module`` tree that contains megatron modules.

    Submodules with a ``sharded_state_dict`` method (megatron's parallel linears, embeddings, MoE layer and
    routers: they know their TP/EP offsets) are asked for theirs; the direct parameters and persistent
    buffers of other modules are TP-sharded along ``partition_dim`` when tagged
    ``tensor_model_parallel``, replicated otherwise (megatron's ``make_*sharded_tensor_for_checkpoint``).
    """
    from megatron.core.transformer.utils import (
        ensure_metadata_has_dp_cp_group,
        make_sharded_tensor_for_checkpoint,
        make_tp_sharded_tensor_for_checkpoint,
    )

    out: dict[str, Any] = {}
    if hasattr(module, "sharded_state_dict"):
        sd = module.sharded_state_dict(
            prefix=prefix, sharded_offsets=(), metadata=ensure_metadata_has_dp_cp_group(None)
        )
        for k, v in sd.items():
            if isinstance(v, ShardedTensor) and getattr(v.data, "shared_embedding", False):
                # the last pipeline stage's copy of the embedding (MTP input): the same tensor as
                # embed_tokens.weight, stored once (a non-main replica), so any pp layout loads it
                rid = v.replica_id if isinstance(v.replica_id, tuple) else (v.replica_id,)
                v = dataclasses.replace(
                    v, key=v.key.replace("mtp_embed_tokens.", "embed_tokens.", 1), replica_id=(1,) + tuple(rid[1:])
                )
            out[k] = v
        return out
    own: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters(recurse=False):
        own[name] = p
    non_persistent = getattr(module, "_non_persistent_buffers_set", set())
    for name, b in module.named_buffers(recurse=False):
        if b is not None and name not in non_persistent:
            own[name] = b
    for name, t in own.items():
        key = f"{prefix}{name}"
        if getattr(t, "tensor_model_parallel", False):
            out[key] = make_tp_sharded_tensor_for_checkpoint(t, key, tp_axis=getattr(t, "partition_dim", 0))
        else:
            out[key] = make_sharded_tensor_for_checkpoint(t, key)
    for cname, child in module.named_children():
        out.update(module_sharded_state_dict(child, f"{prefix}{cname}."))
    return out


def _params(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for g in opt.param_groups for p in g["params"]]


def _is_main_first_shard(sh: ShardedTensor) -> bool:
    rid = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
    return all(r == 0 for r in rid) and all(o == 0 for o in sh.global_offset)


def _factory_is_main(p: torch.Tensor) -> bool:
    """Main replica of a parameter wrapped in a ShardedTensorFactory (megatron's fused GLU fc1)."""
    from megatron.core import parallel_state as ps

    if is_expert_param(p):
        return ps.get_expert_tensor_parallel_rank() == 0 and ps.get_expert_data_parallel_rank() == 0
    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0


def _scalar_sharded(sh: Any, p: torch.Tensor, value: torch.Tensor, key: str) -> ShardedTensor:
    data = value.detach().reshape(1).to(torch.float64).clone()
    main = _is_main_first_shard(sh) if isinstance(sh, ShardedTensor) else _factory_is_main(p)
    return ShardedTensor.from_rank_offsets(key, data, replica_id=0 if main else 1)


def optimizer_state_keys(opt: torch.optim.Optimizer) -> dict[str, dict[str, str]]:
    """{state_key: {"kind": "param"|"scalar"|"number", "dtype": str}} over all parameters of ``opt``."""
    keys: dict[str, dict[str, str]] = {}
    for p in _params(opt):
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                keys.setdefault(k, {"kind": "param", "dtype": str(v.dtype).replace("torch.", "")})
            elif isinstance(v, torch.Tensor) and v.numel() == 1:
                keys.setdefault(k, {"kind": "scalar", "dtype": str(v.dtype).replace("torch.", "")})
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.setdefault(k, {"kind": "number", "dtype": type(v).__name__})
            else:
                raise TypeError(
                    f"optimizer {type(opt).__name__}: state '{k}' of shape "
                    f"{getattr(v, 'shape', type(v))} is neither parameter-shaped nor a scalar; "
                    f"it cannot be checkpointed with resharding"
                )
    return keys


def init_optimizer_state(opt: torch.optim.Optimizer, keys: dict[str, dict[str, str]]) -> None:
    """Create zero state entries (the load targets) for every parameter of ``opt`` that lacks them."""
    for p in _params(opt):
        st = opt.state[p]
        for k, spec in keys.items():
            if k in st:
                continue
            if spec["kind"] == "param":
                st[k] = torch.zeros_like(p, dtype=getattr(torch, spec["dtype"]))
            elif spec["kind"] == "scalar":
                st[k] = torch.zeros((), dtype=getattr(torch, spec["dtype"]), device=p.device)
            else:
                st[k] = 0


def _entries(name: str, opt: torch.optim.Optimizer, model_sd: dict[str, Any]):
    id_map = get_param_id_to_sharded_param_map(model_sd, _params(opt))
    for i, p in enumerate(_params(opt)):
        if i not in id_map:
            raise ValueError(
                f"optimizer '{name}': parameter #{i} {tuple(p.shape)} is not in the model's sharded state dict"
            )
        yield p, id_map[i]


def optimizer_sharded_state_dict(name: str, opt: torch.optim.Optimizer, model_sd: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # dict keys carry the parameter's index: several parameters of a rank may share a sharded key (megatron's
    # layer-stacked tensors); the ShardedTensor keys (what the checkpoint stores) do not depend on it
    for i, (p, sh) in enumerate(_entries(name, opt, model_sd)):
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                out[f"{k}.{sh.key}.{i}"] = make_sharded_optimizer_tensor(sh, v, f"optimizer.{name}.{k}")
            else:
                t = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                out[f"{k}.{sh.key}.{i}"] = _scalar_sharded(sh, p, t, f"optimizer.{name}.scalar.{k}.{sh.key}")
    return out


def optimizer_entries(
    name: str, opt: torch.optim.Optimizer, model_sd: dict[str, Any]
) -> list[tuple[torch.nn.Parameter, str]]:
    """(parameter, sharded key) pairs; compute before ``dist_checkpointing.load`` (it consumes model_sd)."""
    return [(p, f"{sh.key}.{i}") for i, (p, sh) in enumerate(_entries(name, opt, model_sd))]


def restore_optimizer_state(
    opt: torch.optim.Optimizer,
    entries: list[tuple[torch.nn.Parameter, str]],
    loaded: dict[str, Any],
    keys: dict[str, dict[str, str]],
) -> None:
    """Write the tensors ``dist_checkpointing.load`` returned back into ``opt.state``."""
    for p, key in entries:
        st = opt.state[p]
        for k, spec in keys.items():
            val = loaded[f"{k}.{key}"]
            if spec["kind"] == "param":
                st[k].copy_(val)
            elif spec["kind"] == "scalar":
                st[k] = val.reshape(()).to(getattr(torch, spec["dtype"])).clone()
            else:
                st[k] = int(val.item()) if spec["dtype"] == "int" else float(val.item())


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def pack(obj: Any) -> torch.Tensor:
    """Pickle ``obj`` into a uint8 tensor (megatron loads checkpoint objects with ``weights_only=True``)."""
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).clone()


def unpack(t: torch.Tensor) -> Any:
    return pickle.loads(t.numpy().tobytes())


def per_rank_object(key: str, data: Any, rank: int, world: int) -> ShardedObject:
    """A per-rank object; ``data=None`` builds a load template."""
    return ShardedObject(key, None if data is None else pack(data), (world,), (rank,), replica_id=0)


def _has_own_sharding(opt: torch.optim.Optimizer) -> bool:
    """Optimizers that shard their own state (parallel.muon.Muon: momentum lives on owner ranks;
    parallel.zero_adamw.ZeroAdamW: AdamW state on cell owners)."""
    return hasattr(opt, "sharded_state_dict") and hasattr(opt, "load_sharded_state")


def _name_to_sharded(model: torch.nn.Module, model_sd: dict[str, Any]) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    by_id = {}
    for v in nested_values(model_sd):
        if isinstance(v, (ShardedTensor, ShardedTensorFactory)):
            by_id[id(v.data)] = v
    return {n: by_id[id(p)] for m in _modules(model) for n, p in m.named_parameters() if id(p) in by_id}


def _opt_sharded(
    name: str,
    opt: torch.optim.Optimizer,
    model: torch.nn.Module,
    model_sd: dict[str, Any],
    keys: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``keys``: for a load, the checkpoint's state keys (used by optimizers with ``checkpoint_state_keys``)."""
    if _has_own_sharding(opt):
        extra = {"keys": keys} if keys is not None and hasattr(opt, "checkpoint_state_keys") else {}
        return opt.sharded_state_dict(_name_to_sharded(model, model_sd), prefix=f"optimizer.{name}.", **extra)
    return optimizer_sharded_state_dict(name, opt, model_sd)


def _opt_keys(opt: torch.optim.Optimizer) -> dict[str, Any]:
    if hasattr(opt, "checkpoint_state_keys"):
        return opt.checkpoint_state_keys()
    return {"__own__": {"kind": "own", "dtype": ""}} if _has_own_sharding(opt) else optimizer_state_keys(opt)


def build_state(
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    common: dict[str, Any],
    rank_objects: dict[str, Any],
    rank: int,
    world: int,
) -> dict[str, Any]:
    """The full sharded state dict to save: model, optimizers, common (rank-0) state, per-rank objects."""
    model_sd = model_sharded_state_dict(model)
    common = dict(
        common,
        world=world,
        rank_keys=sorted(rank_objects),
        optimizer_keys={n: _opt_keys(o) for n, o in optimizers.items()},
    )
    sd: dict[str, Any] = {
        "model": model_sd,
        "common": common,
        "optimizer": {n: _opt_sharded(n, o, model, model_sd) for n, o in optimizers.items()},
    }
    for k, v in rank_objects.items():
        sd[f"rank.{k}"] = per_rank_object(f"rank.{k}", v, rank, world)
    return sd


def load_state(
    path: Any, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer], rank: int, world: int
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Load a checkpoint saved by :func:`build_state` into ``model`` and ``optimizers`` in place.

    Returns ``(common, rank_objects, same_world)``. With a different world size the per-rank objects are
    those of old rank 0 (the caller decides what to do with them, e.g. reseed the RNGs).
    """
    from pretrain.checkpoint import CheckpointError, CheckpointManager

    common = CheckpointManager.load_common(path).get("common")
    if not isinstance(common, dict) or "optimizer_keys" not in common:
        raise CheckpointError(
            f"{path}: not a checkpoint written by this trainer (no 'common' state); point "
            f"checkpoint.load at a pretrain checkpoint directory"
        )
    missing = sorted(set(common["optimizer_keys"]) ^ set(optimizers))
    if missing:
        raise CheckpointError(
            f"{path}: optimizers {sorted(common['optimizer_keys'])} in the checkpoint, {sorted(optimizers)} in this run"
        )
    own = {n for n, o in optimizers.items() if _has_own_sharding(o)}
    for n, o in optimizers.items():
        if n not in own:
            init_optimizer_state(o, common["optimizer_keys"][n])
    model_sd = model_sharded_state_dict(model)
    keys = common["optimizer_keys"]
    sd: dict[str, Any] = {
        "model": model_sd,
        "optimizer": {n: _opt_sharded(n, o, model, model_sd, keys[n]) for n, o in optimizers.items()},
    }
    old_world = int(common["world"])
    same_world = old_world == world
    for k in common["rank_keys"]:
        obj = per_rank_object(f"rank.{k}", None, rank if same_world else 0, old_world)
        if not same_world:
            obj = dataclasses.replace(obj, replica_id=rank)
        sd[f"rank.{k}"] = obj
    entries = {n: optimizer_entries(n, o, model_sd) for n, o in optimizers.items() if n not in own}
    loaded = CheckpointManager.load(path, sd, strict=True, validate_access=same_world)
    for i, m in enumerate(_modules(model)):
        m.load_state_dict(loaded["model"][f"chunk{i}"], strict=True)
    for n, o in optimizers.items():
        if n in own:
            o.load_sharded_state(loaded["optimizer"][n])
            continue
        restore_optimizer_state(o, entries[n], loaded["optimizer"][n], common["optimizer_keys"][n])
    return common, {k: unpack(loaded[f"rank.{k}"]) for k in common["rank_keys"]}, same_world
