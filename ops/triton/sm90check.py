"""Compile-only check of the Triton kernels for a Hopper (sm_90) target, on a machine without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) runs the kernels but accepts code the compiler rejects (a runtime
``if`` whose branches give differently shaped values, …) and knows nothing of shared memory. Here the real
launchers run on CPU tensors with ``ops.triton.COMPILE_ONLY`` set and ``JITFunction.run`` replaced: every
launch is bound and specialised exactly as Triton's own launcher does (same binder, same ``_pack_args``, the
CUDA backend of an sm_90 target) and compiled through ``triton.compile`` down to a cubin with the bundled
ptxas, instead of being run. Each distinct compilation is recorded with its shared memory (the number the
runtime compares with the device limit, 232448 bytes on an H100/H200, ``OutOfResources`` above it), its
grid, and, when the bundled ``cuobjdump`` is there, registers and stack (spills) per thread.

    python -m ops.triton.sm90check [--quick]        # V4 shapes of every kernel; exit status 1 on any failure

Kernel outputs are left unwritten (the host code after a launch sees garbage, which only feeds later
launches). Must run in a process where ``TRITON_INTERPRET`` is unset (``triton.jit`` reads it at definition).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90 (227 KB)
GRID_YZ_LIMIT = 65535


@dataclass
class Record:
    kernel: str
    constexprs: dict
    options: dict
    grid: tuple
    shared: int = -1
    regs: int = -1
    stack: int = -1
    error: str = ""
    estimate: int = -1
    problems: list = field(default_factory=list)

    def line(self) -> str:
        cx = ",".join(f"{k}={v}" for k, v in self.constexprs.items() if not str(k).startswith("_"))
        st = "OK" if not self.problems else "FAIL: " + "; ".join(self.problems)
        est = f" est={self.estimate:>7d}" if self.estimate >= 0 else ""
        return (
            f"{self.kernel:28s} smem={self.shared:>7d}{est} regs={self.regs:>4d} stack={self.stack:>4d} "
            f"warps={self.options.get('num_warps')} stages={self.options.get('num_stages')} "
            f"grid={self.grid} [{cx}] {st}"
        )


RECORDS: list[Record] = []
_SEEN: dict = {}


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread from ``cuobjdump -res-usage`` on the cubin; (-1, -1) if unavailable."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump") or ""
    if not tool:
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        except Exception:  # noqa: BLE001 — informative only
            return -1, -1
    regs = stack = -1
    for tok in out.replace(",", " ").split():
        if tok.startswith("REG:"):
            regs = int(tok[4:])
        elif tok.startswith("STACK:"):
            stack = int(tok[6:])
    return regs, stack


def _attention_estimate(rec: Record):
    """``hybrid_attention.smem_estimate`` for an attention-kernel compilation (None for other kernels)."""
    which = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dq_kernel": "dq", "_attn_bwd_dkv_kernel": "dkv"}.get(rec.kernel)
    if which is None:
        return None
    from ops.triton import hybrid_attention as ha

    c = rec.constexprs
    esz = 4 if c.get("PREC") == "tf32x3" or c.get("UPCAST") else 2
    rows, keys = (c["BM"], c["BNK"]) if which == "dkv" else (c["BH"], c["BN"])
    return ha.smem_estimate(
        which, rows, keys, c["D"], esz, rec.options.get("num_stages") or 1, c.get("COMP", 0) if which != "dkv" else 0
    )


@contextlib.contextmanager
def capture(arch: int = 90):
    """Within the block, launches of ``triton.jit`` kernels compile for ``cuda:arch`` instead of running."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("sm90check needs TRITON_INTERPRET unset (kernels defined for the compiler)")
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime import jit as rjit

    import ops.triton as pkg

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    orig_run = rjit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = rjit.create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        key = (self.fn.__qualname__, str(specialization), str(options))
        if callable(grid):
            grid = grid(bound_args)
        grid = tuple(int(g) for g in grid)
        if key in _SEEN:
            return None
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        cx = {self.params[p[0]].name: v for p, v in constexprs.items() if len(p) == 1}
        rec = Record(self.fn.__qualname__, cx, {"num_warps": options.num_warps, "num_stages": options.num_stages}, grid)
        _SEEN[key] = rec
        RECORDS.append(rec)
        if len(grid) > 1 and max(grid[1:]) > GRID_YZ_LIMIT:
            rec.problems.append(f"grid y/z above {GRID_YZ_LIMIT}")
        if grid and grid[0] >= 2**31:
            rec.problems.append("grid x above 2^31-1")
        try:
            src = ASTSource(self, signature, constexprs, attrs)
            k = triton.compile(src, target=target, options=options.__dict__)
        except Exception as e:  # noqa: BLE001 — recorded as the failure it is on the GPU
            rec.error = f"{type(e).__name__}: {str(e)[-1500:]}"
            rec.problems.append("compile error")
            return None
        rec.shared = int(k.metadata.shared)
        if rec.shared > SMEM_LIMIT:
            rec.problems.append(f"shared memory {rec.shared} > {SMEM_LIMIT}")
        est = _attention_estimate(rec)
        if est is not None:
            rec.estimate = est
            if rec.shared > est:
                rec.problems.append(f"smem_estimate {est} below the compiled {rec.shared}")
        cubin = k.asm.get("cubin") if hasattr(k, "asm") else None
        if cubin:
            rec.regs, rec.stack = _resource_usage(cubin)
        return None

    prev = pkg.COMPILE_ONLY
    rjit.JITFunction.run = run
    pkg.COMPILE_ONLY = True
    try:
        yield RECORDS
    finally:
        rjit.JITFunction.run = orig_run
        pkg.COMPILE_ONLY = prev


# ------------------------------------------------------------------------------------------- the V4 shapes
def _attention(D: int, dtype, mode: str, S: int = 256, H: int = 64, window: int = 128, topk: int = 512) -> None:
    import torch

    from ops import compressor
    from ops.triton import hybrid_attention as tri

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, S, H, D, generator=g).to(dtype).requires_grad_()
    kv = torch.randn(1, S, D, generator=g).to(dtype).requires_grad_()
    sinks = torch.randn(H, generator=g).requires_grad_()
    seg = torch.zeros(1, S, dtype=torch.long)
    kw: dict = dict(seg_start=seg)
    if mode != "window":
        rate = 4 if mode == "topk" else 128
        lay = compressor.compressed_layout(seg, compressor.document_positions(seg), rate)
        kw["comp_kv"] = torch.randn(1, lay.num_slots, D, generator=g).to(dtype).requires_grad_()
        if mode == "range":
            kw["comp_lo"], kw["comp_hi"] = lay.visible_lo, lay.visible_hi
        else:
            k = min(topk, lay.num_slots)
            kw["comp_idx"] = torch.arange(k).expand(1, S, k).contiguous()
    o, lse = tri.hybrid_attention(q, kv, sinks, D**-0.5, window, **kw)
    torch.autograd.backward((o, lse), (torch.zeros_like(o), torch.zeros_like(lse)))


def _mhc(dtype, T: int = 64, n: int = 4, d: int = 4096) -> None:
    import torch

    from ops.triton import mhc_post, mhc_pre

    x = torch.randn(T, n, d).to(dtype).requires_grad_()
    fn = (torch.randn((2 + n) * n, n * d) * (n * d) ** -0.5).requires_grad_()
    base = torch.zeros((2 + n) * n).requires_grad_()
    scale = torch.ones(3).requires_grad_()
    x_in, post, comb = mhc_pre.mhc_pre(x, fn, base, scale, 1e-6, 1e-6, 20)
    y = mhc_post.mhc_post(x_in, x, post, comb)
    y.backward(torch.zeros_like(y))
    fh = (torch.randn(n, n * d) * (n * d) ** -0.5).requires_grad_()
    h = mhc_pre.hc_head(x, fh, torch.zeros(n).requires_grad_(), torch.ones(1).requires_grad_(), 1e-6, 1e-6)
    h.backward(torch.zeros_like(h))
    lg = torch.randn(T, n, n).requires_grad_()
    c = mhc_pre.sinkhorn(lg, 20, 1e-6)
    c.backward(torch.zeros_like(c))


def _ns(dtype_fp32: bool, E: int = 2, m: int = 2048, n: int = 1024) -> None:
    import torch

    from ops.triton import newton_schulz

    X = torch.randn(E, m, n).to(torch.bfloat16)
    newton_schulz.newton_schulz(X, fp32=dtype_fp32)


def _compressor(dtype) -> None:
    import torch

    from ops import compressor as ref
    from ops.triton import compressor as tri

    S = 512
    seg = torch.zeros(1, S, dtype=torch.long)
    for rate, c in ((4, 512), (128, 512)):
        overlap = rate == 4
        C = 2 * c if overlap else c
        kv = torch.randn(1, S, C).to(dtype).requires_grad_()
        gate = torch.randn(1, S, C).to(dtype).requires_grad_()
        bias = torch.randn(rate, C).requires_grad_()
        lay = ref.compressed_layout(seg, ref.document_positions(seg), rate)
        y = tri.compressor_pool(kv, gate, bias, lay.block_start, lay.prev_valid if overlap else None)
        y.backward(torch.zeros_like(y))


def _indexer(dtype) -> None:
    import torch

    from ops import compressor
    from ops.triton import indexer as tri

    S, HI, cI, rate = 256, 64, 128, 4
    N = S // rate
    seg = torch.zeros(1, S, dtype=torch.long)
    lay = compressor.compressed_layout(seg, compressor.document_positions(seg), rate)
    q = torch.randn(1, S, HI, cI).to(dtype)
    keys = torch.randn(1, N, cI).to(dtype)
    w = torch.randn(1, S, HI).to(dtype)
    for k in (16, 512):
        tri.indexer_select(q, keys, w, lay.visible_lo, lay.visible_hi, k)
        tri.indexer_topk(torch.randn(1, S, N), lay.visible_lo, lay.visible_hi, k)


def cases(quick: bool = False):
    """(name, thunk) of every V4-shaped launch to check; ``quick``: bf16 only for attention and mHC."""
    import torch

    out = []
    dts = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    for dt in dts:
        out.append((f"mhc {dt}", lambda dt=dt: _mhc(dt)))
    out.append(("newton_schulz bf16", lambda: _ns(False)))
    if not quick:
        out.append(("newton_schulz fp32", lambda: _ns(True)))
    for D in (512, 128) if not quick else (512,):
        for dt in dts:
            for mode in ("window", "range", "topk"):
                out.append((f"attention D={D} {dt} {mode}", lambda D=D, dt=dt, mode=mode: _attention(D, dt, mode)))
    if not quick:
        for dt in dts:
            out.append((f"compressor {dt}", lambda dt=dt: _compressor(dt)))
        out.append(("indexer bf16", lambda: _indexer(torch.bfloat16)))
    return out


def check(names: list[str] | None = None, quick: bool = False, verbose: bool = True) -> list[Record]:
    import torch

    torch.set_num_threads(1)
    failed_cases = []
    with capture():
        for name, thunk in cases(quick):
            if names and not any(n in name for n in names):
                continue
            n0 = len(RECORDS)
            try:
                thunk()
            except Exception as e:  # noqa: BLE001 — a host-side failure of the launcher
                failed_cases.append(f"{name}: {type(e).__name__}: {e}")
            if verbose:
                print(f"# {name}: {len(RECORDS) - n0} new compilations", flush=True)
                for r in RECORDS[n0:]:
                    print("  " + r.line(), flush=True)
                    if r.error:
                        print("    " + r.error.replace("\n", "\n    "), flush=True)
    for f in failed_cases:
        print("HOST FAILURE " + f, flush=True)
        RECORDS.append(Record("host", {}, {}, (), problems=[f]))
    return RECORDS


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("names", nargs="*", help="substrings of case names to run (default: all)")
    a = ap.parse_args()
    recs = check(a.names, a.quick)
    bad = [r for r in recs if r.problems]
    print(f"sm90check: {len(recs)} compilations, {len(bad)} failing", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
