"""Long-context training step of a config (default ``tiny``) on CPU: time against the FLOP model, memory growth.

    python benchmarks/bench_long_context.py --seq 4096 8192 16384 32768 [--sp 1] [--recompute none]
        [--threads 1] [--steps 2] [--reference-upto 8192] [--tag NAME]

For every sequence length S a fresh process (``--sp 2``: two gloo ranks, Ulysses sequence parallel) builds the
model (seed 0, ``model.ops_backend=auto``: the blocked CPU ops), draws one sequence of S random tokens (seed 1;
labels and MTP labels are the next and second-next tokens: the same batch, sharded, for every layout) and runs
``--steps`` training steps (forward with labels and MTP labels, backward, zero_grad; the same number at every
length); the last step is timed (wall and process CPU seconds). The step processes run with
``THP_MEM_ALLOC_ENABLE=1`` (``--default-allocator``: without): torch's CPU allocator then backs its large
tensors with 2 MiB transparent huge pages, where the default faults in every 4 KiB page of every fresh
temporary — at 32K tokens that was 20% of the step's CPU time and made the per-token cost of the LINEAR layers
grow with S (their tensors outgrow the caches and are re-faulted every step). Memory growth = peak RSS of the
process minus its RSS after building the model and the batch (under sp: the sum over the ranks — the machine's
memory). FLOP-model time = ``pretrain.flop_model.step_flops`` / the single-thread fp32 matmul rate measured at
the start ([1024, 1024] products), so ``time / FLOP-model time`` is 1.0 for a step that runs at matmul speed;
what matters is how it changes with S (its value over the first row's). ``--reference-upto``: for S up to
this length the same step is also run with ``ops_backend=reference`` (the materialising reference ops) and
the loss difference reported (the streamed ops must give the same loss).

Prints a table and writes ``benchmarks/results/bench_long_context[_TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rank(rank: int, world: int, port: int, spec: dict, q) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        q.put((rank, "ok", _step(rank, world, spec)))
    except BaseException:
        import traceback

        q.put((rank, "error", traceback.format_exc()))


def _step(rank: int, world: int, spec: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(spec["threads"])
    from parallel.process_groups import init_distributed, teardown
    from pretrain.config import ParallelConfig, load_config
    from pretrain.model.transformer import DeepSeekV4Model

    S, sp = spec["seq"], spec["sp"]
    cfg = load_config(
        spec["config"],
        [
            f"model.recompute={spec['recompute']}",
            f"model.ops_backend={spec['backend']}",
            f"model.max_position_embeddings={max(S, 4096)}",
        ],
    ).model
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world)
    init_distributed(ParallelConfig(sp=sp), cfg)
    from ops import dispatch

    dispatch.set_backend(cfg.ops_backend)
    torch.manual_seed(0)
    model = DeepSeekV4Model(cfg).train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (1, S + 2), generator=g)  # one LM sequence: labels = next ids
    local = slice(rank * S // sp, (rank + 1) * S // sp)
    ids, labels, mtp_labels = (tokens[:, o : o + S][:, local].contiguous() for o in (0, 1, 2))
    base = _rss_gib()
    res = {}
    for _ in range(spec["steps"]):
        w0, c0 = time.perf_counter(), time.process_time()
        out = model(ids, labels=labels, mtp_labels=mtp_labels)
        out["loss"].backward()
        model.zero_grad(set_to_none=True)
        res = dict(
            step_s=time.perf_counter() - w0,
            cpu_s=time.process_time() - c0,
            loss=float(out["loss"]),
            lm_loss=float(out["lm_loss"]),
            indexer_loss=float(out["indexer_loss"]),
        )
    res.update(growth_gib=_peak_gib() - base, peak_gib=_peak_gib())
    teardown()
    return res


def run_one(spec: dict) -> dict:
    """One measurement in fresh process(es); under sp the ranks' memory growths are summed, times maxed."""
    ctx = mp.get_context("spawn")
    world = spec["sp"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, spec, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in range(world):
            rank, status, val = q.get(timeout=spec["timeout"])
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{val}")
            results[rank] = val
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    r0 = results[0]
    return dict(
        step_s=max(r["step_s"] for r in results.values()),
        cpu_s=max(r["cpu_s"] for r in results.values()),
        growth_gib=sum(r["growth_gib"] for r in results.values()),
        peak_gib=sum(r["peak_gib"] for r in results.values()),
        # each rank's loss is its tokens' sum over (global count / sp): the global mean is the ranks' mean
        loss=sum(r["loss"] for r in results.values()) / world,
        rank_losses=[results[r]["loss"] for r in range(world)],
        lm_loss=sum(r["lm_loss"] for r in results.values()) / world,
        indexer_loss=r0["indexer_loss"],
    )


def matmul_gflops(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--sp", type=int, default=1)
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="steps per length (the last is timed)")
    ap.add_argument("--reference-upto", type=int, default=0, help="also run ops_backend=reference up to this S")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--tag", default="")
    ap.add_argument(
        "--default-allocator",
        action="store_true",
        help="do not set THP_MEM_ALLOC_ENABLE=1 (torch's CPU allocator then faults in 4 KiB pages)",
    )
    args = ap.parse_args()
    if not args.default_allocator:  # inherited by the spawned step processes
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from pretrain.config import load_config
    from pretrain.flop_model import step_flops

    cfg = load_config(args.config, [f"model.recompute={args.recompute}"]).model
    rate = matmul_gflops(args.threads)
    print(f"fp32 matmul rate ({args.threads} thread(s)): {rate:.1f} GFLOP/s", flush=True)
    rows = []
    for S in args.seq:
        spec = dict(
            config=args.config,
            seq=S,
            sp=args.sp,
            recompute=args.recompute,
            backend=args.backend,
            threads=args.threads,
            steps=args.steps,
            timeout=args.timeout,
        )
        r = run_one(spec)
        fl = step_flops(cfg, S, recompute=args.recompute)
        r.update(seq=S, flops=fl.total, quadratic_flops=fl.quadratic, flop_time_s=fl.total / (rate * 1e9))
        if S <= args.reference_upto:
            ref = run_one(dict(spec, backend="reference", steps=1))
            r.update(reference_loss=ref["loss"], reference_growth_gib=ref["growth_gib"], reference_step_s=ref["step_s"])
        rows.append(r)
        print(f"S={S}: {r['step_s']:.1f} s, growth {r['growth_gib']:.2f} GiB, loss {r['loss']:.5f}", flush=True)
    first = rows[0]
    print(
        f"\n{args.config}, sp={args.sp}, recompute={args.recompute}, {args.threads} thread(s), "
        f"ops_backend={args.backend}"
    )
    print(
        f"{'S':>8}{'step s':>9}{'cpu s':>9}{'µs/tok':>8}{'MFLOP/tok':>10}{'t/t_FLOP':>9}{'rel. 4K':>8}"
        f"{'growth GiB':>11}{'×/doubling':>11}{'loss':>10}{'ref Δloss':>11}"
    )
    prev = None
    for r in rows:
        ratio = r["cpu_s"] / r["flop_time_s"]
        r["time_over_flop_time"] = ratio
        r["ratio_vs_first"] = ratio / (first["cpu_s"] / first["flop_time_s"])
        per_doubling = None
        if prev is not None:
            import math

            per_doubling = (r["growth_gib"] / prev["growth_gib"]) ** (1 / math.log2(r["seq"] / prev["seq"]))
        r["growth_per_doubling"] = per_doubling
        dl = abs(r["loss"] - r["reference_loss"]) if "reference_loss" in r else None
        print(
            f"{r['seq']:>8}{r['step_s']:>9.2f}{r['cpu_s']:>9.2f}{r['cpu_s'] / r['seq'] * 1e6:>8.0f}"
            f"{r['flops'] / r['seq'] / 1e6:>10.2f}{ratio:>9.2f}{r['ratio_vs_first']:>8.2f}{r['growth_gib']:>11.2f}"
            f"{(f'{per_doubling:.2f}' if per_doubling else '-'):>11}{r['loss']:>10.5f}"
            f"{(f'{dl:.1e}' if dl is not None else '-'):>11}"
        )
        prev = r
    import torch

    name = "bench_long_context" + (f"_{args.tag}" if args.tag else "")
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                machine=dict(
                    cpus=os.cpu_count(),
                    processor=platform.processor() or platform.machine(),
                    python=platform.python_version(),
                    torch=torch.__version__,
                    threads=args.threads,
                    matmul_gflops=rate,
                    loadavg_at_end=os.getloadavg(),
                ),
                config=args.config,
                sp=args.sp,
                recompute=args.recompute,
                backend=args.backend,
                method="fresh process per length; last of --steps steps timed; growth = peak RSS - RSS before the step "
                "(summed over sp ranks); ratio on process CPU seconds",
                thp_mem_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
                rows=rows,
            ),
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
