"""Muon benchmarks: prints tables and writes JSON.

    python benchmarks/bench_muon.py [--device cpu|cuda] [--out runs/bench/bench_muon_<device>.json] [--quick]

Sections:
1. ``step``: one optimizer step of our Muon (plain and Gram-form NS) vs torch AdamW on the same
   V4-like parameter set (attention-like matrices, a fused [gate; up] projection, 3-D expert stacks).
2. ``vs_megatron``: our update vs megatron-core's TensorParallelMuon default update on the same matrices
   and gradients (3 steps): time per step, relative difference of the two updates, and each update's
   distance to the exact polar-factor Muon (SVD). emerging-optimizers (which megatron's Muon needs) is
   not installed here (Python 3.12-only package; installing it makes ``import megatron.core`` import it and
   needs a typing.override shim first), so this uses a faithful reimplementation of its default path:
   EMA momentum ``m.lerp_(g, 1 - beta)``, Nesterov ``g.lerp(m, beta)``, ``F.normalize(eps=1e-7)``,
   5 "quintic" NS steps with the per-step coefficients of emerging_optimizers.muon_utils, scale
   ``sqrt(max(n, m))`` ("spectral") times ``extra_scale_factor`` (set to our 0.18 so magnitudes compare),
   decoupled weight decay.
3. ``ns``: Newton-Schulz variants (plain, Gram-form, megatron's 5-step quintic): time and relative error
   vs the SVD polar factor U V^T and vs float64 plain NS.
4. ``--device cuda`` adds ``experts``: batched expert NS throughput on 64 matrices of 2048 x 1024 in
   bf16 and fp32: a Python loop of per-matrix NS (what a per-parameter optimizer does) vs one batched
   call of ours (plain and Gram form), in TFLOP/s of useful NS flops (the plain-form count,
   K (4 s^2 l + 2 s^3) per matrix, for all variants, so higher = faster).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ops.newton_schulz import V4_NS_STEPS, newton_schulz, newton_schulz_gram, ns_flops
from parallel.muon import Muon

MEGATRON_QUINTIC = [
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], device: str, reps: int, warmup: int = 1) -> float:
    """Median wall time in ms."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def megatron_ns(x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """emerging_optimizers.muon_utils.newton_schulz(x, steps=5, coefficient_type='quintic'), re-written."""
    tr = x.size(-2) > x.size(-1)
    if tr:
        x = x.mT
    X = torch.nn.functional.normalize(x, p=2, dim=(-2, -1), eps=1e-7)
    if bf16:
        X = X.to(torch.bfloat16)
    for a, b, c in MEGATRON_QUINTIC:
        A = X @ X.mT
        B = torch.addmm(A, A, A, alpha=c, beta=b)
        X = torch.addmm(X, B, X, alpha=1.0, beta=a)
    X = X.to(torch.float32)
    return X.mT if tr else X


class MegatronMuonRef:
    """Reimplementation of megatron TensorParallelMuon's default update (see the module doc)."""

    def __init__(self, params, lr, beta=0.95, wd=0.1, extra_scale=0.18, bf16=False):
        self.params, self.lr, self.beta, self.wd, self.extra, self.bf16 = params, lr, beta, wd, extra_scale, bf16
        self.m = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self):
        for p, m in zip(self.params, self.m):
            g = p.grad
            m.lerp_(g, 1 - self.beta)
            u = g.lerp(m, self.beta)
            o = megatron_ns(u.float(), self.bf16) * math.sqrt(max(p.shape)) * self.extra
            p.mul_(1 - self.lr * self.wd).add_(o.to(p.dtype), alpha=-self.lr)


def v4_like_params(device: str, scale: int, gen: torch.Generator) -> list[tuple[str, torch.nn.Parameter]]:
    d, h, inter, E = 256 * scale, 512 * scale, 128 * scale, 8
    specs = [
        ("wq_a", (h // 2, d)),
        ("wq_b", (h, h // 2)),
        ("wkv", (d // 2, d)),
        ("wo_a", (d, h)),
        ("wo_b", (d, d)),
        ("shared_fc1", (2 * inter, d)),
        ("shared_fc2", (d, inter)),
        ("experts_fc1", (E, 2 * inter, d)),
        ("experts_fc2", (E, d, inter)),
    ]
    out = []
    for name, shape in specs:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device) * 0.02)
        if name.endswith("fc1"):
            p.v4_blocks = [inter, inter]
        if name.startswith("experts"):
            p.v4_expert = True
        out.append((name, p))
    return out


def bench_step(device: str, reps: int, scale: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    base = v4_like_params(device, scale, gen)
    grads = [torch.randn(p.shape, generator=gen).to(device) for _, p in base]
    nparams = sum(p.numel() for _, p in base)
    cases: list[tuple[str, Callable[[list], Any]]] = [
        ("muon_plain_fp32", lambda ps: Muon(ps, lr=1e-3, fp32_newton_schulz=True)),
        ("muon_gram_fp32", lambda ps: Muon(ps, lr=1e-3, fp32_newton_schulz=True, ns_impl="gram")),
        ("adamw_foreach", lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-3, foreach=True)),
        ("adamw_for_loop", lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-3, foreach=False)),
    ]
    if device == "cuda":
        cases.insert(2, ("muon_plain_bf16", lambda ps: Muon(ps, lr=1e-3, fp32_newton_schulz=False)))
        cases.insert(3, ("muon_gram_bf16", lambda ps: Muon(ps, lr=1e-3, fp32_newton_schulz=False, ns_impl="gram")))
        cases.append(("adamw_fused", lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-3, fused=True)))
    for label, make in cases:
        ps = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in base]
        for (_, q), (_, p) in zip(ps, base):
            for a in ("v4_blocks", "v4_expert"):
                if hasattr(p, a):
                    setattr(q, a, getattr(p, a))
        for (_, p), g in zip(ps, grads):
            p.grad = g.clone()
        opt = make(ps)
        ms = timeit(opt.step, device, reps)
        rows.append(dict(case=label, ms=round(ms, 3), params=nparams))
    adam = next(r["ms"] for r in rows if r["case"] == "adamw_foreach")
    for r in rows:
        r["x_adamw_foreach"] = round(r["ms"] / adam, 2)
    return rows


def bench_vs_megatron(device: str, reps: int, scale: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    shapes = [(256 * scale, 256 * scale), (256 * scale, 1024 * scale), (1024 * scale, 256 * scale)]
    for shape in shapes:
        W0 = torch.randn(shape, generator=gen).to(device) * 0.02
        grads = [torch.randn(shape, generator=gen).to(device) for _ in range(3)]
        res: dict[str, Any] = dict(shape=list(shape))
        deltas = {}
        for label in ("ours_fp32", "megatron_fp32") + (("ours_bf16", "megatron_bf16") if device == "cuda" else ()):
            p = torch.nn.Parameter(W0.clone())
            bf16 = label.endswith("bf16")
            opt = (
                Muon([p], lr=1e-2, fp32_newton_schulz=not bf16)
                if label.startswith("ours")
                else MegatronMuonRef([p], lr=1e-2, bf16=bf16)
            )
            for g in grads:
                p.grad = g
                opt.step()
            deltas[label] = p.detach() - W0 * (1 - 1e-2 * 0.1) ** 3
            p.grad = grads[-1]
            res[f"{label}_ms"] = round(timeit(opt.step, device, reps), 3)
        # exact-polar Muon (our momentum / Nesterov, SVD instead of NS) as the ideal reference
        m = torch.zeros(shape, dtype=torch.float64, device=device)
        ideal = torch.zeros(shape, dtype=torch.float64, device=device)
        for g in grads:
            m = 0.95 * m + g.double()
            ideal = ideal * (1 - 1e-2 * 0.1) - 1e-2 * polar(0.95 * m + g.double()) * math.sqrt(max(shape)) * 0.18
        res["ours_vs_megatron_rel_diff"] = round(rel(deltas["ours_fp32"], deltas["megatron_fp32"]), 4)
        res["ours_vs_polar_rel_err"] = round(rel(deltas["ours_fp32"], ideal), 5)
        res["megatron_vs_polar_rel_err"] = round(rel(deltas["megatron_fp32"], ideal), 5)
        rows.append(res)
    return rows


def bench_ns(device: str, reps: int, scale: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(2)
    rows = []
    shapes = [
        (256 * scale, 256 * scale),
        (256 * scale, 1024 * scale),
        (512 * scale, 2048 * scale),
        (1024 * scale, 256 * scale),
    ]
    for shape in shapes:
        G = torch.randn(shape, generator=gen, dtype=torch.float64)
        pol = polar(G).to(device)
        ref64 = newton_schulz(G.to(device), V4_NS_STEPS, True)
        G32 = G.float().to(device)
        variants = [
            ("plain_fp32", lambda: newton_schulz(G32, V4_NS_STEPS, True)),
            ("gram_fp32", lambda: newton_schulz_gram(G32, V4_NS_STEPS, True)),
            ("megatron_quintic5_fp32", lambda: megatron_ns(G32, False)),
        ]
        if device == "cuda":
            variants += [
                ("plain_bf16", lambda: newton_schulz(G32, V4_NS_STEPS, False)),
                ("gram_bf16", lambda: newton_schulz_gram(G32, V4_NS_STEPS, False)),
                ("megatron_quintic5_bf16", lambda: megatron_ns(G32, True)),
            ]
        for label, fn in variants:
            out = fn()
            rows.append(
                dict(
                    shape=list(shape),
                    variant=label,
                    ms=round(timeit(fn, device, reps), 3),
                    err_vs_polar=float(f"{rel(out, pol):.3e}"),
                    err_vs_fp64_ns=float(f"{rel(out, ref64):.3e}"),
                )
            )
    return rows


def bench_experts(reps: int) -> list[dict[str, Any]]:
    """64 expert matrices 2048 x 1024 on CUDA: loop of per-matrix NS vs one batched call."""
    E, n, m = 64, 2048, 1024
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(E, n, m, generator=gen).cuda()
    flops = E * ns_flops(min(n, m), max(n, m), 10)
    rows = []
    for prec, fp32 in (("bf16", False), ("fp32", True)):
        cases = [
            ("loop_plain", lambda: [newton_schulz(g, V4_NS_STEPS, fp32) for g in G]),
            ("batched_plain", lambda: newton_schulz(G, V4_NS_STEPS, fp32)),
            ("loop_gram", lambda: [newton_schulz_gram(g, V4_NS_STEPS, fp32) for g in G]),
            ("batched_gram", lambda: newton_schulz_gram(G, V4_NS_STEPS, fp32)),
        ]
        ref = newton_schulz(G.double()[:4], V4_NS_STEPS, True)
        for label, fn in cases:
            ms = timeit(fn, "cuda", reps, warmup=2)
            out = fn()
            first = out[:4] if torch.is_tensor(out) else torch.stack(out[:4])
            rows.append(
                dict(
                    precision=prec,
                    case=label,
                    ms=round(ms, 3),
                    tflops=round(flops / ms / 1e9, 1),
                    err_vs_fp64=float(f"{rel(first, ref):.2e}"),
                )
            )
    return rows


def table(title: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    for r in rows:
        cols += [k for k in r if k not in cols]
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = [f"\n## {title}", " | ".join(c.ljust(width[c]) for c in cols), "-+-".join("-" * width[c] for c in cols)]
    lines += [" | ".join(str(r.get(c, "")).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smaller matrices (CI smoke)")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    scale = 1 if (args.quick or dev == "cpu") else 4
    reps = args.reps or (3 if dev == "cpu" else 10)
    result: dict[str, Any] = dict(
        device=dev,
        torch=torch.__version__,
        machine=platform.machine(),
        threads=torch.get_num_threads(),
        scale=scale,
        gpu=torch.cuda.get_device_name() if dev == "cuda" else None,
    )
    sections = [
        ("step", "optimizer step (ms), same parameter set", bench_step),
        ("vs_megatron", "ours vs megatron TensorParallelMuon default update (reimplemented)", bench_vs_megatron),
        ("ns", "Newton-Schulz variants: time and error", bench_ns),
    ]
    for key, title, fn in sections:
        result[key] = fn(dev, reps, scale)
        print(table(title, result[key]), flush=True)
    if dev == "cuda":
        result["experts"] = bench_experts(reps)
        print(
            table("64 experts 2048x1024: loop vs batched NS (TFLOP/s of plain-form NS flops)", result["experts"]),
            flush=True,
        )
    out = args.out or os.path.join("runs", "bench", f"bench_muon_{dev}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
