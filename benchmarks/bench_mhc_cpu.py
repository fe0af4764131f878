"""CPU eager mHC: plain-autograd Sinkhorn vs the hand-written-backward Sinkhorn (ops/mhc.py), side by side.

    python benchmarks/bench_mhc_cpu.py [--tokens 256 4096] [--d 128 1024] [--n 4] [--iters 20] [--reps 15]

For each (T, d): ``mhc_pre`` forward + backward on x [T, n, d] (fp32, random weights and upstream gradients)
with ``ops.mhc.sinkhorn`` as shipped (``_SinkhornFn``: one autograd node, in-place iterations in an [n, n, T]
layout, hand-written backward) and with it swapped for ``sinkhorn_autograd`` (the plain definition: autograd
records every op of the 2·iters − 1 normalisations). The Sinkhorn alone (fwd + bwd on the same [T, n, n] comb
logits) is timed the same way. The two variants run alternately in one process (order flipped every round), so
both see the same machine load. Reported: median wall ms and median process CPU ms (all threads; it does not
count waiting for a core on a shared machine) over ``--reps`` rounds; the speedup plain / function (> 1 = the
function is faster) of the medians and, "paired", the median of the per-round ratios (the two runs of a round
saw nearly the same load); the bytes per token that autograd saves for the Sinkhorn's backward (unique
storages, measured with saved-tensor hooks). Also checked per row: outputs bit-identical, gradients
‖Δ‖/‖ref‖. Runs with 1 thread by default. Prints a table and writes ``benchmarks/results/bench_mhc_cpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ops import mhc  # noqa: E402

RMS_EPS = 1e-6
HC_EPS = 1e-6


@contextlib.contextmanager
def plain_sinkhorn() -> Iterator[None]:
    """Make ``mhc_pre`` use ``sinkhorn_autograd`` (it looks ``sinkhorn`` up in ops.mhc at call time)."""
    shipped = mhc.sinkhorn
    mhc.sinkhorn = mhc.sinkhorn_autograd
    try:
        yield
    finally:
        mhc.sinkhorn = shipped


def make_inputs(t: int, n: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = (2 + n) * n
    base = torch.randn(rows, generator=g)
    base[2 * n :] *= 3  # comb logits ~N(0, 3): far from doubly stochastic
    return {
        "x": torch.randn(t, n, d, generator=g),
        "fn": torch.randn(rows, n * d, generator=g) / (n * d) ** 0.5,
        "base": base,
        "scale": torch.rand(3, generator=g) + 0.5,
        "g_xin": torch.randn(t, d, generator=g),
        "g_post": torch.randn(t, n, generator=g),
        "g_comb": torch.randn(t, n, n, generator=g),
        "logits": torch.randn(t, n, n, generator=g) * 3,
    }


def mhc_pre_step(inp: dict[str, torch.Tensor], iters: int):
    """One mhc_pre forward + backward; returns (outputs, grads of x, fn, base, scale)."""
    args = [inp[k].detach().clone().requires_grad_() for k in ("x", "fn", "base", "scale")]
    outs = mhc.mhc_pre(*args, RMS_EPS, HC_EPS, iters)
    torch.autograd.backward(outs, (inp["g_xin"], inp["g_post"], inp["g_comb"]))
    return outs, [a.grad for a in args]


def sinkhorn_step(inp: dict[str, torch.Tensor], iters: int):
    """Sinkhorn alone: forward + backward on the comb logits; returns ((M,), (∂L,))."""
    leaf = inp["logits"].detach().clone().requires_grad_()
    out = mhc.sinkhorn(leaf, iters, HC_EPS)
    out.backward(inp["g_comb"])
    return (out,), (leaf.grad,)


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn`` builds its graph."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def time_pair(step: Callable[[], object], reps: int) -> dict[str, dict[str, float]]:
    """Alternate function / plain runs of ``step`` (ABBA order); median wall and process-CPU ms of each."""
    runs = {"function": contextlib.nullcontext, "plain": plain_sinkhorn}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for ctx in runs.values():  # warm-up
        with ctx():
            step()
    for r in range(reps):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            with runs[name]():
                w0, c0 = time.perf_counter(), time.process_time()
                step()
                cpu[name].append((time.process_time() - c0) * 1e3)
                wall[name].append((time.perf_counter() - w0) * 1e3)
    out: dict[str, dict[str, float]] = {
        k: {"wall_ms": statistics.median(wall[k]), "cpu_ms": statistics.median(cpu[k]), "wall_ms_min": min(wall[k])}
        for k in runs
    }
    # paired: the two runs of one round saw nearly the same load, so their ratio drifts less than the medians
    out["paired"] = {
        f"ratio_{m}": statistics.median(p / f for p, f in zip(v["plain"], v["function"]))
        for m, v in (("wall", wall), ("cpu", cpu))
    }
    return out


def bench_row(t: int, n: int, d: int, iters: int, reps: int) -> list[dict]:
    inp = make_inputs(t, n, d)
    rows = []
    for what, step in (("mhc_pre", mhc_pre_step), ("sinkhorn", sinkhorn_step)):
        outs_f, grads_f = step(inp, iters)
        with plain_sinkhorn():
            outs_p, grads_p = step(inp, iters)
        times = time_pair(lambda step=step: step(inp, iters), reps)
        row = {
            "op": what,
            "T": t,
            "n": n,
            "d": d,
            "iters": iters,
            "plain_wall_ms": times["plain"]["wall_ms"],
            "function_wall_ms": times["function"]["wall_ms"],
            "plain_cpu_ms": times["plain"]["cpu_ms"],
            "function_cpu_ms": times["function"]["cpu_ms"],
            "plain_wall_ms_min": times["plain"]["wall_ms_min"],
            "function_wall_ms_min": times["function"]["wall_ms_min"],
            "ratio_wall": times["plain"]["wall_ms"] / times["function"]["wall_ms"],
            "ratio_cpu": times["plain"]["cpu_ms"] / times["function"]["cpu_ms"],
            "ratio_wall_paired": times["paired"]["ratio_wall"],
            "ratio_cpu_paired": times["paired"]["ratio_cpu"],
            "outputs_bit_identical": all(torch.equal(a, b) for a, b in zip(outs_f, outs_p)),
            "grad_rel_diff_max": max(rel(a, b) for a, b in zip(grads_f, grads_p)),
        }
        if what == "sinkhorn":
            logits = inp["logits"].detach().requires_grad_()
            row["function_saved_bytes_per_token"] = saved_bytes(lambda: mhc.sinkhorn(logits, iters, HC_EPS)) / t
            row["plain_saved_bytes_per_token"] = saved_bytes(lambda: mhc.sinkhorn_autograd(logits, iters, HC_EPS)) / t
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--d", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_mhc_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for t in args.tokens:
        for d in args.d:
            for row in bench_row(t, args.n, d, args.iters, args.reps):
                if row["op"] == "sinkhorn" and any(r["op"] == "sinkhorn" and r["T"] == t for r in rows):
                    continue  # the Sinkhorn alone does not depend on d: one row per T
                rows.append(row)
                print(
                    f"{row['op']:8s} T={t:5d} d={d:5d}: plain {row['plain_wall_ms']:8.2f} ms, function "
                    f"{row['function_wall_ms']:8.2f} ms wall ({row['ratio_wall']:.2f}x), cpu "
                    f"{row['plain_cpu_ms']:8.2f} / {row['function_cpu_ms']:8.2f} ms ({row['ratio_cpu']:.2f}x)",
                    flush=True,
                )

    print()
    print(
        f"mHC on CPU, n={args.n}, {args.iters} Sinkhorn iterations, fp32, {args.threads} thread(s), "
        f"medians of {args.reps} alternating rounds"
    )
    print(
        "| op (fwd+bwd) | T | d | plain autograd CPU ms | function CPU ms | speedup CPU time (paired) "
        "| wall ms plain / function | speedup wall (paired) | outputs identical | grad ‖Δ‖/‖ref‖ |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        d = "—" if r["op"] == "sinkhorn" else str(r["d"])
        print(
            f"| {r['op']} | {r['T']} | {d} | {r['plain_cpu_ms']:.2f} | {r['function_cpu_ms']:.2f} | "
            f"{r['ratio_cpu']:.2f}× ({r['ratio_cpu_paired']:.2f}×) | "
            f"{r['plain_wall_ms']:.2f} / {r['function_wall_ms']:.2f} | "
            f"{r['ratio_wall']:.2f}× ({r['ratio_wall_paired']:.2f}×) | {r['outputs_bit_identical']} | "
            f"{r['grad_rel_diff_max']:.1e} |"
        )
    for r in rows:
        if r["op"] == "sinkhorn":
            print(
                f"saved for backward by the Sinkhorn, T={r['T']}: plain {r['plain_saved_bytes_per_token']:.0f} "
                f"B/token, function {r['function_saved_bytes_per_token']:.0f} B/token"
            )

    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "loadavg_at_end": list(os.getloadavg()),
        },
        "method": "mhc_pre / sinkhorn fwd+bwd, shipped sinkhorn (_SinkhornFn) vs sinkhorn_autograd, alternating "
        "in one process (ABBA); medians",
        "reps": args.reps,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
