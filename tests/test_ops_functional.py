"""``ops.functional``: one typed function per registered op, in step with every implementation.

* Coverage: every name in ``ops.dispatch.registered()`` has a function of that name (and no function is
  left over).
* Signatures (``inspect.signature``): each function's parameter names, in order, are those of every
  registered implementation of its op (reference, blocked, Triton — the Triton kernels' signatures are read
  from their source with ``ast``, because importing a kernel module defines its kernels, which the Triton
  interpreter tests must do themselves after setting ``TRITON_INTERPRET``); its defaults are the reference's;
  the leading tensor inputs are positional-or-keyword and every argument from the first scalar or optional one
  on is keyword-only; every parameter and the return value are annotated.
* Results: for four representative ops (``hybrid_attention`` with compressed entries and a selection,
  ``apply_rope`` inverse, ``mhc_pre``, ``linear_cross_entropy``) the typed function gives exactly (``torch.equal``,
  tolerance 0) the result of the implementation ``dispatch.get`` resolves, on the ``reference`` and the ``auto``
  backend (blocked on the CPU): the same function runs on the same inputs.
* Library call sites: no module of pretrain/ or parallel/ calls ``dispatch.get`` / ``dispatch.call``.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import re
import typing
from typing import Any, Callable

import pytest
import torch

from ops import dispatch
from ops import functional as op
from ops.compressor import compressed_layout

ROOT = pathlib.Path(__file__).resolve().parents[1]
OP_NAMES = sorted(dispatch.registered())


def _implementations(name: str) -> dict[str, Callable[..., Any]]:
    out = {}
    for kind in dispatch.registered()[name]:
        with dispatch.backend(kind):
            out[kind] = dispatch.get(name)
    return out


def _param_names(kind: str, name: str, fn: Callable[..., Any]) -> list[str]:
    """Parameter names of an implementation; for a lazily loaded Triton kernel, of its function in the source."""
    if kind != "triton":
        return list(inspect.signature(fn).parameters)
    from ops import triton as tri

    module, func = tri.KERNELS[name]
    tree = ast.parse((ROOT / "ops" / "triton" / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            a = node.args
            return [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    raise AssertionError(f"ops/triton/{module}.py defines no function {func}")


def test_every_registered_op_has_a_typed_function():
    assert sorted(op.__all__) == OP_NAMES
    for name in OP_NAMES:
        assert inspect.isfunction(getattr(op, name, None)), f"ops.functional has no function {name}"


@pytest.mark.parametrize("name", OP_NAMES)
def test_signature_matches_every_implementation(name):
    typed = inspect.signature(getattr(op, name))
    names = list(typed.parameters)
    impls = _implementations(name)
    assert "reference" in impls, f"op {name} has no reference"
    for kind, fn in impls.items():
        assert _param_names(kind, name, fn) == names, f"{name}: the {kind} implementation's parameters differ"
    ref = inspect.signature(impls["reference"]).parameters
    for p in typed.parameters.values():
        assert p.default == ref[p.name].default, f"{name}({p.name}=...): default differs from the reference"


@pytest.mark.parametrize("name", OP_NAMES)
def test_tensors_lead_and_the_rest_is_keyword_only(name):
    fn = getattr(op, name)
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters.values())
    assert "return" in hints and all(p.name in hints for p in params), f"{name}: missing annotations"
    n_lead = next((i for i, p in enumerate(params) if hints[p.name] is not torch.Tensor), len(params))
    assert n_lead >= 1, f"{name}: the first parameter must be a tensor"
    for i, p in enumerate(params):
        want = inspect.Parameter.POSITIONAL_OR_KEYWORD if i < n_lead else inspect.Parameter.KEYWORD_ONLY
        assert p.kind == want, f"{name}({p.name}): {p.kind.description}, expected {want.description}"


def _attention_inputs(g: torch.Generator) -> dict[str, Any]:
    B, S, H, D, rate, k = 2, 23, 3, 8, 4, 3
    seg_start = torch.zeros(B, S, dtype=torch.long)
    seg_start[1, 9:] = 9  # two documents in row 1
    pos = torch.arange(S).expand(B, S) - seg_start
    lay = compressed_layout(seg_start, pos, rate)
    N = lay.block_start.shape[1]
    scores = torch.randn(B, S, N, generator=g)
    return {
        "q": torch.randn(B, S, H, D, generator=g),
        "kv": torch.randn(B, S, D, generator=g),
        "sinks": torch.randn(H, generator=g),
        "scale": D**-0.5,
        "window": 5,
        "seg_start": seg_start,
        "comp_kv": torch.randn(B, N, D, generator=g),
        "comp_lo": lay.visible_lo,
        "comp_hi": lay.visible_hi,
        "comp_idx": dispatch.get("indexer_topk", scores)(scores, lay.visible_lo, lay.visible_hi, k),
    }


def _rope_inputs(g: torch.Generator) -> dict[str, Any]:
    ang = torch.rand(2, 7, 1, 3, generator=g) * 6.0
    return {"x": torch.randn(2, 7, 4, 10, generator=g), "cos": ang.cos(), "sin": ang.sin(), "inverse": True}


def _mhc_pre_inputs(g: torch.Generator) -> dict[str, Any]:
    T, n, d = 11, 4, 6
    rows = (2 + n) * n
    return {
        "x": torch.randn(T, n, d, generator=g),
        "fn": torch.randn(rows, n * d, generator=g) * 0.1,
        "base": torch.randn(rows, generator=g) * 0.1,
        "scale": torch.rand(3, generator=g),
        "rms_eps": 1e-6,
        "hc_eps": 1e-6,
        "iters": 20,
    }


def _lce_inputs(g: torch.Generator) -> dict[str, Any]:
    labels = torch.randint(0, 13, (17,), generator=g)
    labels[3] = -100
    return {
        "h": torch.randn(17, 5, generator=g),
        "weight": torch.randn(13, 5, generator=g),
        "labels": labels,
        "ignore_index": -100,
    }


NUMERIC = {
    "hybrid_attention": _attention_inputs,
    "apply_rope": _rope_inputs,
    "mhc_pre": _mhc_pre_inputs,
    "linear_cross_entropy": _lce_inputs,
}


def _flat(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", sorted(NUMERIC))
def test_typed_function_gives_the_resolved_implementations_result(name, backend):
    """Exact equality (tolerance 0): the typed function only names the arguments of the same call."""
    args = NUMERIC[name](torch.Generator().manual_seed(7))
    first = next(iter(args.values()))
    typed = getattr(op, name)
    positional = [p.name for p in inspect.signature(typed).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    with dispatch.backend(backend):
        impl = dispatch.get(name, first)
        want = _flat(impl(*args.values()))  # the old call style: every argument by position
        got = _flat(typed(*(args[k] for k in positional), **{k: v for k, v in args.items() if k not in positional}))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"{name} on {backend} ({impl.__name__}): typed result differs"


def test_library_calls_ops_through_functional_only():
    pattern = re.compile(r"dispatch\.(get|call)\(")
    offenders = [
        f"{path.relative_to(ROOT)}:{i}"
        for pkg in ("pretrain", "parallel")
        for path in sorted((ROOT / pkg).rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"call the typed ops.functional functions instead: {offenders}"
