"""Benchmark + correctness check of the Triton kernels (ops/triton) on one CUDA GPU, in one run.

    python benchmarks/bench_kernels.py --out DIR [--tokens 4096,16384,65536,131072] [--budget 300]

For every kernel and size: check against the PyTorch reference where the reference fits (rel. error
‖tri − ref‖/‖ref‖), then time it (triton.testing.do_bench, median) and record peak memory. Cases:

* newton_schulz: 64 matrices 2048×1024 bf16 (V4 schedule, 10 iterations) vs the reference's plain bmm loop;
  TFLOP/s by ``ops.newton_schulz.ns_flops`` (full flop count, the triangle savings are not counted).
* mhc: mhc_pre + mhc_post forward+backward (n = 4, d = 4096, bf16 streams) vs the eager reference.
* hybrid attention (H = 64 heads, D = 512, window 128): CSA (rate 4, top-k 512), HCA (rate 128, range) and
  sliding-only, forward and forward+backward; effective TFLOP/s counting only attended entries
  (``attention_flops``). Side by side: PyTorch SDPA dense causal attention at the same S (flash backend at
  head dim 128; head dim 512 where a backend accepts it), its TFLOP/s counting the causal half.
* compressor_pool and indexer_topk where their Triton kernels exist.

Everything is written as it comes to DIR/bench.json (list of records) and a table is printed at the end.
A global time budget (seconds) skips the remaining cases once spent; each case is wrapped so a failure
(compile error, OOM) is recorded and the run continues.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

RESULTS: list[dict] = []
OUT = "."
T0 = time.time()
BUDGET = 300.0


def flush() -> None:
    with open(os.path.join(OUT, "bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def record(**kw) -> None:
    kw["t_wall"] = round(time.time() - T0, 1)
    RESULTS.append(kw)
    flush()
    print(json.dumps(kw), flush=True)


def left() -> float:
    return BUDGET - (time.time() - T0)


def bench(fn, rep_ms: float = 60.0) -> tuple[float, float]:
    """(median ms, peak GiB) of fn()."""
    import triton

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    ms = triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")
    return ms, peak


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def case(name: str):
    def deco(fn):
        def run(*a, **kw):
            if left() < 5:
                record(case=name, args=str(a), status="skipped (time budget)")
                return
            try:
                fn(*a, **kw)
            except Exception as e:  # keep going: record and continue with the next case
                record(
                    case=name,
                    args=str(a),
                    status=f"error: {type(e).__name__}: {str(e)[:300]}",
                    trace=traceback.format_exc()[-1500:],
                )
            finally:
                torch.cuda.empty_cache()

        return run

    return deco


# ------------------------------------------------------------------------------------------ Newton-Schulz
@case("newton_schulz")
def bench_ns(E: int = 64, m: int = 2048, n: int = 1024) -> None:
    from ops import newton_schulz as ref
    from ops.triton import newton_schulz as tri

    g = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(E, m, n, device="cuda", generator=g).to(torch.bfloat16)
    s, l = min(m, n), max(m, n)
    flops = E * ref.ns_flops(s, l, ref.num_iterations(ref.V4_NS_STEPS))
    out = tri.newton_schulz(X, fp32=False)
    want = ref.newton_schulz(X, fp32=False)
    err = rel(out, want)
    err32 = rel(out[:4], ref.newton_schulz(X[:4], fp32=True))  # vs the fp32 answer (bf16 error level)
    ms_t, mem_t = bench(lambda: tri.newton_schulz(X, fp32=False))
    ms_r, mem_r = bench(lambda: ref.newton_schulz(X, fp32=False))
    variant = {str(k): v for k, v in tri.last_choice().items()}
    record(
        case="newton_schulz",
        shape=[E, m, n],
        dtype="bf16",
        variant=variant,
        rel_err_vs_ref=err,
        rel_err_vs_fp32_first4=err32,
        ms=ms_t,
        tflops=flops / ms_t / 1e9,
        peak_gib=mem_t,
        ref_ms=ms_r,
        ref_tflops=flops / ms_r / 1e9,
        ref_peak_gib=mem_r,
        speedup=ms_r / ms_t,
        target_tflops=550,
    )


# ------------------------------------------------------------------------------------------------- mHC
@case("mhc")
def bench_mhc(T: int, n: int = 4, d: int = 4096) -> None:
    from ops import mhc as ref
    from ops.triton import mhc_post as tpost
    from ops.triton import mhc_pre as tpre

    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, n, d, device="cuda", generator=g).to(torch.bfloat16)
    fn = torch.randn((2 + n) * n, n * d, device="cuda", generator=g) * (n * d) ** -0.5
    base = torch.randn((2 + n) * n, device="cuda", generator=g) * 0.5
    scale = torch.rand(3, device="cuda", generator=g) + 0.5
    o = torch.randn(T, d, device="cuda", generator=g).to(torch.bfloat16)
    gout = torch.randn(T, n, d, device="cuda", generator=g).to(torch.bfloat16)
    params = [t.clone().requires_grad_() for t in (x, fn, base, scale, o)]

    def step(pre, post):
        xx, ff, bb, ss, oo = params
        for p in params:
            p.grad = None
        x_in, ps, cb = pre(xx, ff, bb, ss, 1e-6, 1e-6, 20)
        y = post(oo + x_in, xx, ps, cb)  # the sub-layer is replaced by a residual add
        y.backward(gout)
        return y

    ref_fits = T <= 32768
    if ref_fits:
        y_r = step(ref.mhc_pre, ref.mhc_post)
        g_r = [p.grad.clone() for p in params]
    y_t = step(tpre.mhc_pre, tpost.mhc_post)
    errs = {}
    if ref_fits:
        errs["out"] = rel(y_t, y_r)
        for nm, p, gr in zip(("dx", "dfn", "dbase", "dscale", "do"), params, g_r):
            errs[nm] = rel(p.grad, gr)
        del y_r, g_r
    ms_t, mem_t = bench(lambda: step(tpre.mhc_pre, tpost.mhc_post))
    ms_f, _ = bench(lambda: tpost.mhc_post(o, x, *tpre.mhc_pre(x, fn, base, scale, 1e-6, 1e-6, 20)[1:]))
    rec = dict(
        case="mhc_fwd_bwd",
        tokens=T,
        n=n,
        d=d,
        dtype="bf16",
        rel_err_vs_ref=errs,
        ms=ms_t,
        fwd_ms=ms_f,
        peak_gib=mem_t,
        gbs_min_traffic=(T * n * d * 2 * 6) / ms_t / 1e6,
    )  # x read 3×, gout read, dx, y write (bf16)
    if ref_fits and left() > 30:
        ms_r, mem_r = bench(lambda: step(ref.mhc_pre, ref.mhc_post), rep_ms=40)
        rec.update(ref_ms=ms_r, ref_peak_gib=mem_r, speedup=ms_r / ms_t, target_speedup=10)
    else:
        rec.update(ref="skipped (memory/time)")
    record(**rec)


# -------------------------------------------------------------------------------------- hybrid attention
def _attn_inputs(S: int, H: int, D: int, mode: str, topk: int, rate: int, window: int, seed: int = 0):
    from ops import compressor

    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, S, H, D, device="cuda", generator=g).to(torch.bfloat16)
    kv = torch.randn(1, S, D, device="cuda", generator=g).to(torch.bfloat16)
    sinks = torch.randn(H, device="cuda", generator=g)
    seg = torch.zeros(1, S, dtype=torch.long, device="cuda")
    kw: dict = dict(seg_start=seg)
    entries = float(sum(min(window, t + 1) for t in range(min(S, window)))) / S + max(0, S - window) * window / S
    if mode != "window":
        lay = compressor.compressed_layout(seg, compressor.document_positions(seg), rate)
        N = lay.num_slots
        kw["comp_kv"] = torch.randn(1, N, D, device="cuda", generator=g).to(torch.bfloat16)
        vis = (lay.visible_hi - lay.visible_lo).float()
        if mode == "range":
            kw["comp_lo"], kw["comp_hi"] = lay.visible_lo, lay.visible_hi
            entries += vis.mean().item()
        else:
            # random distinct visible entries per query (what indexer_topk returns), built without [S, N]
            k = min(topk, N)
            r = torch.rand(1, S, k, device="cuda", generator=g)
            hi = lay.visible_hi[..., None].float()
            idx = torch.sort((r * hi).long(), dim=-1).values  # sorted, may repeat
            dup = torch.zeros_like(idx, dtype=torch.bool)
            dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
            idx = torch.where(dup | (torch.arange(k, device="cuda") >= lay.visible_hi[..., None]), -1, idx)
            kw["comp_idx"] = idx
            entries += (idx >= 0).float().sum(-1).mean().item()
    return q, kv, sinks, kw, entries


@case("hybrid_attention")
def bench_attn(S: int, mode: str, H: int = 64, D: int = 512, window: int = 128, topk: int = 512) -> None:
    from ops import sparse_attention as ref
    from ops.triton import hybrid_attention as tri

    rate = 4 if mode == "topk" else 128
    q, kv, sinks, kw, entries = _attn_inputs(S, H, D, mode, topk, rate, window)
    scale = D**-0.5
    leaves = [q, kv, sinks] + ([kw["comp_kv"]] if "comp_kv" in kw else [])
    for t in leaves:
        t.requires_grad_()
    g = torch.Generator(device="cuda").manual_seed(1)
    go = torch.randn(q.shape, device="cuda", generator=g).to(q.dtype)

    def fwd(f):
        return f(q, kv, sinks, scale, window, **kw)

    def fwd_bwd(f):
        for t in leaves:
            t.grad = None
        o, _ = fwd(f)
        o.backward(go)
        return o

    err = {}
    if S <= 4096:  # the reference forms [S, H, N] scores and [S, window, D] gathers
        o_r = fwd_bwd(ref.hybrid_attention)
        g_r = [t.grad.clone() for t in leaves]
        o_t = fwd_bwd(tri.hybrid_attention)
        err["o"] = rel(o_t, o_r)
        for nm, t, gr in zip(("dq", "dkv", "dsinks", "dcomp_kv"), leaves, g_r):
            err[nm] = rel(t.grad, gr)
        del o_r, g_r
    with torch.no_grad():
        ms_f, mem_f = bench(lambda: fwd(tri.hybrid_attention))
    ms_fb, mem_fb = bench(lambda: fwd_bwd(tri.hybrid_attention))
    ff = tri.attention_flops(1, S, H, D, entries)
    fb = tri.attention_flops(1, S, H, D, entries, with_backward=True)
    record(
        case=f"hybrid_attention_{mode}",
        tokens=S,
        heads=H,
        head_dim=D,
        window=window,
        topk=topk if mode == "topk" else None,
        rate=rate if mode != "window" else None,
        entries_per_query=round(entries, 1),
        rel_err_vs_ref=err or "ref skipped (memory)",
        fwd_ms=ms_f,
        fwd_tflops=ff / ms_f / 1e9,
        fwd_peak_gib=mem_f,
        fwd_bwd_ms=ms_fb,
        fwd_bwd_tflops=fb / ms_fb / 1e9,
        fwd_bwd_peak_gib=mem_fb,
        us_per_1k_tokens_fwd_bwd=ms_fb * 1e3 / (S / 1024),
        target_tflops=400,
    )


@case("sdpa_dense")
def bench_sdpa(S: int, H: int = 64, D: int = 128) -> None:
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(1, H, S, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    k = torch.randn(1, 1, S, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    go = torch.randn(1, H, S, D, device="cuda", generator=g).to(torch.bfloat16)

    def fwd():
        kk = k.expand(1, H, S, D)
        return F.scaled_dot_product_attention(q, kk, kk, is_causal=True)

    def fwd_bwd():
        q.grad = k.grad = None
        fwd().backward(go)

    flops = 4.0 * H * D * S * (S + 1) / 2
    with torch.no_grad():
        ms_f, mem_f = bench(fwd)
    ms_fb, mem_fb = bench(fwd_bwd)
    record(
        case="sdpa_dense_causal",
        tokens=S,
        heads=H,
        head_dim=D,
        fwd_ms=ms_f,
        fwd_tflops=flops / ms_f / 1e9,
        fwd_peak_gib=mem_f,
        fwd_bwd_ms=ms_fb,
        fwd_bwd_tflops=3.5 * flops / ms_fb / 1e9,
        fwd_bwd_peak_gib=mem_fb,
    )


# ------------------------------------------------------------------------------- compressor and indexer
@case("compressor_pool")
def bench_compressor(S: int, rate: int, c: int = 512) -> None:
    from ops import compressor as ref
    from ops.triton import compressor as tri

    overlap = rate == 4
    C = 2 * c if overlap else c
    g = torch.Generator(device="cuda").manual_seed(3)
    kv = torch.randn(1, S, C, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    gate = torch.randn(1, S, C, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(rate, C, device="cuda", generator=g).requires_grad_()
    seg = torch.zeros(1, S, dtype=torch.long, device="cuda")
    lay = ref.compressed_layout(seg, ref.document_positions(seg), rate)
    pv = lay.prev_valid if overlap else None
    go = torch.randn(1, lay.num_slots, c, device="cuda", generator=g).to(torch.bfloat16)

    def fb(f):
        for t in (kv, gate, bias):
            t.grad = None
        y = f(kv, gate, bias, lay.block_start, pv)
        y.backward(go)
        return y

    y_r = fb(ref.compressor_pool)
    g_r = [t.grad.clone() for t in (kv, gate, bias)]
    y_t = fb(tri.compressor_pool)
    err = {"out": rel(y_t, y_r)}
    for nm, t, gr in zip(("dkv", "dgate", "dbias"), (kv, gate, bias), g_r):
        err[nm] = rel(t.grad, gr)
    ms_t, mem_t = bench(lambda: fb(tri.compressor_pool))
    ms_r, mem_r = bench(lambda: fb(ref.compressor_pool), rep_ms=30)
    record(
        case="compressor_pool_fwd_bwd",
        tokens=S,
        rate=rate,
        channels=C,
        rel_err_vs_ref=err,
        ms=ms_t,
        gbs=(S * C * 2 * 5) / ms_t / 1e6,
        peak_gib=mem_t,
        ref_ms=ms_r,
        ref_peak_gib=mem_r,
        speedup=ms_r / ms_t,
    )


@case("indexer_topk")
def bench_indexer(S: int, k: int = 512, HI: int = 64, cI: int = 128, rate: int = 4) -> None:
    from ops import compressor
    from ops import indexer as ref
    from ops.triton import indexer as tri

    g = torch.Generator(device="cuda").manual_seed(4)
    N = S // rate
    q = torch.randn(1, S, HI, cI, device="cuda", generator=g).to(torch.bfloat16)
    keys = torch.randn(1, N, cI, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(1, S, HI, device="cuda", generator=g).to(torch.bfloat16)
    seg = torch.zeros(1, S, dtype=torch.long, device="cuda")
    lay = compressor.compressed_layout(seg, compressor.document_positions(seg), rate)
    idx_t = tri.indexer_select(q, keys, w, lay.visible_lo, lay.visible_hi, k)
    agree = None
    if S <= 16384:
        idx_r = ref.indexer_topk(ref.indexer_scores(q, keys, w), lay.visible_lo, lay.visible_hi, k)
        agree = (idx_t == idx_r).float().mean().item()
    ms_t, mem_t = bench(lambda: tri.indexer_select(q, keys, w, lay.visible_lo, lay.visible_hi, k))
    flops = 2.0 * S * HI * cI * N / 2  # causal half of the q·k products
    rec = dict(
        case="indexer_select_fused",
        tokens=S,
        k=k,
        heads=HI,
        head_dim=cI,
        index_agreement=agree,
        ms=ms_t,
        tflops=flops / ms_t / 1e9,
        peak_gib=mem_t,
    )
    if S <= 16384:
        ms_r, mem_r = bench(
            lambda: ref.indexer_topk(ref.indexer_scores(q, keys, w), lay.visible_lo, lay.visible_hi, k), rep_ms=30
        )
        rec.update(ref_ms=ms_r, ref_peak_gib=mem_r, speedup=ms_r / ms_t)
    record(**rec)


def table() -> None:
    print("\n" + "=" * 118)
    print(
        f"{'case':34s} {'tokens':>7s} {'ms':>9s} {'fwd+bwd ms':>11s} {'TFLOP/s':>9s} {'ref ms':>9s} "
        f"{'speedup':>8s} {'peak GiB':>9s}  err"
    )
    for r in RESULTS:
        if "status" in r:
            print(f"{r['case']:34s} {str(r.get('args', ''))[:20]:>7s}  {r['status'][:70]}")
            continue
        ms = r.get("ms", r.get("fwd_ms"))
        tf = r.get("tflops", r.get("fwd_bwd_tflops"))
        err = r.get("rel_err_vs_ref", r.get("index_agreement"))
        if isinstance(err, dict):
            err = max((v for v in err.values() if isinstance(v, float)), default=float("nan"))
        f = lambda v: (
            f"{v:9.3f}" if isinstance(v, (int, float)) and v is not None and not math.isnan(v) else f"{'-':>9s}"
        )
        print(
            f"{r['case']:34s} {str(r.get('tokens', r.get('shape', ''))):>7s} {f(ms)} {f(r.get('fwd_bwd_ms')):>11s} "
            f"{f(tf)} {f(r.get('ref_ms'))} {f(r.get('speedup')):>8s} "
            f"{f(r.get('peak_gib', r.get('fwd_bwd_peak_gib')))}  {err}"
        )


def main() -> None:
    global OUT, BUDGET
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", default="4096,16384,65536,131072")
    ap.add_argument("--budget", type=float, default=300.0)
    ap.add_argument("--only", default="", help="comma list of: ns,mhc,attn,sdpa,compressor,indexer,attn128")
    a = ap.parse_args()
    OUT, BUDGET = a.out, a.budget
    os.makedirs(OUT, exist_ok=True)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; nothing to do")
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    sizes = [int(s) for s in a.tokens.split(",") if s]
    only = set(a.only.split(",")) - {""}
    want = lambda k: not only or k in only
    record(
        case="device",
        name=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
    )
    # order: attention hd512 (window, range, top-k) and mHC at the first size, NS, the other sizes ≤ 16K,
    # then the larger sizes (a short budget still covers every kernel once)
    small = [S for S in sizes if S <= 16384]
    large = [S for S in sizes if S > 16384]
    for group in (small[:1], None, small[1:], large):
        if group is None:
            if want("ns"):
                bench_ns()
            continue
        for S in group:
            if want("attn"):
                for mode in ("window", "range", "topk"):
                    bench_attn(S, mode)
            if want("mhc"):
                bench_mhc(S)
    for S in sizes:
        if want("sdpa"):
            bench_sdpa(S, D=128)
    for S in sizes[:1]:
        if want("sdpa"):
            bench_sdpa(S, D=512)
    for S in sizes:
        if want("attn128"):
            bench_attn(S, "topk", D=128)
    for S in sizes:
        if want("compressor"):
            bench_compressor(S, 4)
            bench_compressor(S, 128)
        if want("indexer"):
            bench_indexer(S)
    table()
    flush()


if __name__ == "__main__":
    main()
