"""Let megatron-core run on a CUDA-less torch (CPU + gloo). Applied only when CUDA is absent.

megatron-core assumes CUDA in many places. ``apply()`` patches exactly these sites (docs/STACK.md §1-§6),
and does nothing when ``torch.cuda.is_available()``:

1. ``torch.cuda.current_device`` -> ``torch.device("cpu")``: ~200 sites do
   ``tensor.to(device=torch.cuda.current_device())`` (rotary embeddings, MoE, schedules, optimizer).
2. CUDA RNG: ``torch.cuda.get_rng_state/set_rng_state/manual_seed/manual_seed_all`` and megatron's
   ``tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state`` use the CPU generator, so
   ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` work; the tracker's
   "CPU RNG state changed within GPU RNG context" log is silenced (on CPU the two are the same generator).
3. Streams and events: ``torch.cuda.Stream/Event/current_stream/stream/synchronize`` become null objects
   (the all-to-all token dispatcher creates a side stream in its constructor).
4. ``maybe_move_tensor_to_cpu`` in the MoE token dispatcher converts split sizes to numpy only when
   ``tensor.is_cuda``; gloo's ``all_to_all_single`` then receives tensors and fails -> convert on CPU too.
5. Hard-coded ``device="cuda"`` / ``.cuda()`` (pipeline schedules, optimizer, clip_grads, checkpointing,
   ~50 sites, all of them calls of ``torch.tensor/zeros/ones/empty/empty_like/randn`` or ``.to``): the tensor
   factories (``_FACTORIES``), ``Tensor.new_*`` and ``Tensor.to`` are wrapped to map the cuda device to cpu;
   ``Tensor.cuda`` returns the tensor itself. (Not a global ``TorchFunctionMode``: that would route every
   torch call of the model through Python, ~10% of a CPU training step of the tiny model.)
6. ``Tensor.type()`` (no argument) reports ``torch.cuda.*Tensor`` names, because ``clip_grads`` and the
   distributed optimizer assert on them.
7. ``typing.override`` (Python 3.12) is provided from typing_extensions, for emerging-optimizers if present.

Config flags that must accompany it on CPU (set by ``parallel.process_groups.megatron_cpu_flags``):
``use_cpu_initialization``, no fusions, ``moe_grouped_gemm=False``, ``pipeline_dtype=float32``,
``batch_p2p_comm=False`` (batched p2p on gloo gives wrong pipeline results, docs/STACK.md §4).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import typing

import torch

log = logging.getLogger(__name__)

_applied = False
_CPU = torch.device("cpu")
# torch functions that take ``device=``; megatron calls them with device="cuda"
_FACTORIES = (
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "randperm",
    "eye",
    "linspace",
    "empty_strided",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "randn_like",
)
_TENSOR_FACTORIES = ("new_tensor", "new_zeros", "new_ones", "new_empty", "new_full")
PATCHES: list[str] = []  # names of what was patched, for tests and logs


class _NullStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


def _device_kw_to_cpu(fn):
    """``fn`` with a cuda ``device=`` keyword replaced by the CPU."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        d = kwargs.get("device")
        if d is not None and _is_cuda_device(d):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    wrapper.__wrapped_cpu_compat__ = True
    return wrapper


def _tensor_to_cpu(orig):
    """``Tensor.to`` with a cuda device (positional or ``device=``) replaced by the CPU."""

    @functools.wraps(orig)
    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = (_CPU,) + args[1:]
        d = kwargs.get("device")
        if d is not None and _is_cuda_device(d):
            kwargs["device"] = _CPU
        return orig(self, *args, **kwargs)

    to.__wrapped_cpu_compat__ = True
    return to


def _cpu_tensor_type(orig):
    names = {
        "torch.FloatTensor": "torch.cuda.FloatTensor",
        "torch.HalfTensor": "torch.cuda.HalfTensor",
        "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
        "torch.DoubleTensor": "torch.cuda.DoubleTensor",
        "torch.LongTensor": "torch.cuda.LongTensor",
        "torch.IntTensor": "torch.cuda.IntTensor",
    }

    def type_(self, *args, **kwargs):
        if not args and not kwargs:
            t = orig(self)
            return names.get(t, t)
        return orig(self, *args, **kwargs)

    type_.__wrapped_cpu_compat__ = True
    return type_


def _maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    if not isinstance(tensor, torch.Tensor):  # None, or a Python int (num_out_tokens when EP == 1)
        return tensor
    tensor = tensor.cpu() if tensor.device.type != "cpu" else tensor
    return tensor.numpy() if as_numpy else tensor


def _patch_typing_override() -> None:
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
        PATCHES.append("typing.override")


def apply(force: bool = False) -> bool:
    """Patch torch/megatron for CPU. Returns True if patches were applied (False when CUDA exists)."""
    global _applied
    _patch_typing_override()
    if _applied:
        return True
    if torch.cuda.is_available() and not force:
        return False

    cpu = torch.device("cpu")
    gen = torch.default_generator
    torch.cuda.current_device = lambda: cpu
    torch.cuda.device_count = lambda: 0
    torch.cuda.get_rng_state = lambda device=None: gen.get_state()
    torch.cuda.set_rng_state = lambda state, device=None: gen.set_state(state)
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.current_stream = lambda device=None: _NullStream()
    torch.cuda.default_stream = lambda device=None: _NullStream()
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.max_memory_allocated = lambda device=None: 0
    torch.cuda.memory_allocated = lambda device=None: 0
    torch.cuda.reset_peak_memory_stats = lambda device=None: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    PATCHES.extend(["torch.cuda.current_device", "torch.cuda rng", "torch.cuda streams/events", "torch.Tensor.cuda"])
    if not getattr(torch.Tensor.type, "__wrapped_cpu_compat__", False):
        torch.Tensor.type = _cpu_tensor_type(torch.Tensor.type)
        PATCHES.append("torch.Tensor.type")

    try:
        from megatron.core.tensor_parallel import random as mrandom

        mrandom._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: (
            gen.get_state().clone() if clone else gen.get_state()
        )
        mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: gen.set_state(new_state)
        logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
        PATCHES.append("megatron rng tracker")
    except ImportError:  # megatron not installed: torch-only patches suffice
        pass
    try:
        from megatron.core.transformer.moe import moe_utils, token_dispatcher

        moe_utils.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu
        token_dispatcher.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu
        PATCHES.append("moe maybe_move_tensor_to_cpu")
    except (ImportError, AttributeError):
        pass

    # ``with torch.device(...)`` recognises factories by identity in a cached set: fill it with the
    # originals (what our wrappers call) before the names are rebound
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        fn = getattr(torch, name)
        if not getattr(fn, "__wrapped_cpu_compat__", False):
            setattr(torch, name, _device_kw_to_cpu(fn))
    for name in _TENSOR_FACTORIES:
        fn = getattr(torch.Tensor, name)
        if not getattr(fn, "__wrapped_cpu_compat__", False):
            setattr(torch.Tensor, name, _device_kw_to_cpu(fn))
    if not getattr(torch.Tensor.to, "__wrapped_cpu_compat__", False):
        torch.Tensor.to = _tensor_to_cpu(torch.Tensor.to)
    PATCHES.append("device='cuda' -> cpu (tensor factories, Tensor.new_*, Tensor.to)")
    _applied = True
    log.debug("cpu_compat applied: %s", PATCHES)
    return True


def is_applied() -> bool:
    return _applied
