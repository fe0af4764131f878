"""CPU training-step throughput and peak memory: our DeepSeekV4Model vs HF DeepseekV4ForCausalLM, same weights.

    python benchmarks/bench_model_cpu.py [--configs tiny small] [--steps 5] [--threads 1] [--dtype float32]
        [--seq tiny=128x2,1024x1,4096x1 small=256x2,2048x1]     (NAME=seq[xbatch],... ; batch default --batch)

``--dtype bfloat16`` loads both models in bf16 (weights and activations; HF's eager attention then multiplies in
bf16, our CPU ops keep fp32 softmax statistics and compute their products in fp32).

(The committed results use ``--threads 1``: on the shared 2-core machine the OpenMP threads of a 2-thread run
spin-wait for each other, which inflates both wall and CPU time.)

For each config: an HF model with random weights is saved once; for each sequence length, ours (through
``model_from_hf``, ops backend ``auto``: the blocked hybrid attention on CPU) and HF's are loaded in two spawned
processes (so each peak RSS is its own) that stay alive and take turns: one warm-up step
each, then ``--steps`` rounds of one HF step followed by one of ours (forward with labels, backward, zero_grad)
on the same random batch. Alternating keeps both under the same machine load; on a shared, oversubscribed
machine wall time per step varies by 10x between minutes, so numbers from separate sequential runs are not
comparable. Reported per model: median wall seconds per step and tokens/s, median process CPU seconds per
step (user + system of all its threads: insensitive to waiting for a core, but it counts OpenMP spin-waits)
and the speedups ours/HF on both, peak RSS (total, and the growth over the loaded model). Prints a table and
writes ``benchmarks/results/bench_model_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(which: str, hf_dir: str, batch: int, seq: int, threads: int, dtype_name: str, conn) -> None:
    """Load one model, then run one training step per "step" message; reply (wall s, cpu s, loss)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    if which == "ours":
        from pretrain.model.hf import model_from_hf

        model = model_from_hf(hf_dir, dtype=dtype).train()
        vocab = model.cfg.vocab_size

        def step(ids, labels):
            out = model(ids, labels=labels, mtp_labels=None)
            out["loss"].backward()
            return out["lm_loss"].item()
    else:
        from transformers import DeepseekV4ForCausalLM

        model = DeepseekV4ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=dtype).train()
        vocab = model.config.vocab_size

        def step(ids, labels):
            out = model(ids, labels=labels)
            out.loss.backward()
            return out.loss.item()

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    base = _rss_mib()
    conn.send("ready")
    while conn.recv() == "step":
        w0, c0 = time.perf_counter(), time.process_time()
        loss = step(ids, labels)
        model.zero_grad(set_to_none=True)
        conn.send((time.perf_counter() - w0, time.process_time() - c0, loss))
    conn.send(
        dict(
            peak_rss_mib=_peak_mib(),
            step_growth_mib=_peak_mib() - base,
            params=sum(p.numel() for p in model.parameters()),
        )
    )


def run_pair(hf_dir: str, batch: int, seq: int, steps: int, threads: int, dtype: str) -> dict[str, dict]:
    """Both models in their own processes, stepping alternately (HF, ours, HF, ours, ...)."""
    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    for which in ("hf", "ours"):
        parent, child = ctx.Pipe()
        procs[which] = ctx.Process(target=_worker, args=(which, hf_dir, batch, seq, threads, dtype, child))
        procs[which].start()
        conns[which] = parent
    try:
        for which in ("hf", "ours"):
            if not conns[which].poll(3600) or conns[which].recv() != "ready":
                raise RuntimeError(f"{which}: the worker did not start")
        samples: dict[str, list] = {"hf": [], "ours": []}
        for i in range(steps + 1):  # round 0 is the warm-up
            for which in ("hf", "ours"):
                conns[which].send("step")
                res = conns[which].recv()
                if i:
                    samples[which].append(res)
        out = {}
        for which in ("hf", "ours"):
            conns[which].send("stop")
            info = conns[which].recv()
            walls = [s[0] for s in samples[which]]
            cpus = [s[1] for s in samples[which]]
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            out[which] = dict(
                model=which,
                step_s=wall,
                step_s_min=min(walls),
                cpu_s=cpu,
                tokens_per_s=batch * seq / wall,
                tokens_per_cpu_s=batch * seq / cpu,
                loss=samples[which][-1][2],
                **info,
            )
        return out
    finally:
        for p in procs.values():
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "small"])
    ap.add_argument(
        "--seq", nargs="*", default=["tiny=128x2,1024x1,4096x1", "small=256x2,2048x1"], help="NAME=seq[xbatch],..."
    )
    ap.add_argument("--batch", type=int, default=2, help="batch when a --seq entry gives none")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each model per round)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=None, help="default benchmarks/results/bench_model_cpu[_bfloat16].json")
    args = ap.parse_args()
    if args.out is None:
        suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
        args.out = str(ROOT / "benchmarks" / "results" / f"bench_model_cpu{suffix}.json")
    seqs = {}
    for spec in args.seq:
        name, _, runs = spec.partition("=")
        seqs[name] = [
            (int(r.split("x")[0]), int(r.split("x")[1]) if "x" in r else args.batch) for r in runs.split(",") if r
        ]

    import torch
    from transformers import DeepseekV4ForCausalLM

    from pretrain.config import load_config
    from pretrain.model.hf import hf_config_from_model_config
    from pretrain.model.moe import make_hash_table

    rows = []
    for name in args.configs:
        cfg = load_config(name).model
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            hf_cfg = hf_config_from_model_config(cfg)
            hf = DeepseekV4ForCausalLM(hf_cfg)
            with torch.no_grad():  # HF initialises the hash table to zeros: use a real one (distinct experts)
                for mod_name, buf in hf.named_buffers():
                    if mod_name.endswith("tid2eid"):
                        buf.copy_(make_hash_table(cfg.vocab_size, cfg.n_routed_experts, cfg.num_experts_per_tok, 0))
            hf.save_pretrained(tmp)
            del hf
            for seq, batch in seqs.get(name, [(128, args.batch)]):
                res = run_pair(tmp, batch, seq, args.steps, args.threads, args.dtype)
                for w in ("hf", "ours"):
                    rows.append(dict(config=name, dtype=args.dtype, batch=batch, seq=seq, **res[w]))
                rows[-1]["speedup_vs_hf"] = res["ours"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
                rows[-1]["speedup_vs_hf_cpu"] = res["ours"]["tokens_per_cpu_s"] / res["hf"]["tokens_per_cpu_s"]
                rows[-1]["memory_vs_hf"] = res["ours"]["step_growth_mib"] / res["hf"]["step_growth_mib"]
                print(
                    f"{name} {args.dtype} {batch}x{seq}: ours/HF tokens/s {rows[-1]['speedup_vs_hf']:.2f}", flush=True
                )

    print(
        f"{'config':<7}{'model':<6}{'B×S':>9}{'params':>10}{'step s':>9}{'tok/s':>9}{'cpu s':>9}"
        f"{'tok/cpu-s':>10}{'peak MiB':>10}{'+step MiB':>10}{'speedup':>9}{'(cpu)':>7}{'mem':>6}"
    )
    for r in rows:
        print(
            f"{r['config']:<7}{r['model']:<6}{r['batch']}×{r['seq']:<6}{r['params'] / 1e6:>9.1f}M"
            f"{r['step_s']:>9.3f}{r['tokens_per_s']:>9.0f}{r['cpu_s']:>9.3f}{r['tokens_per_cpu_s']:>10.0f}"
            f"{r['peak_rss_mib']:>10.0f}{r['step_growth_mib']:>10.0f}"
            f"{r.get('speedup_vs_hf', float('nan')):>9.2f}{r.get('speedup_vs_hf_cpu', float('nan')):>7.2f}"
            f"{r.get('memory_vs_hf', float('nan')):>6.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                machine=dict(
                    cpus=os.cpu_count(),
                    python=platform.python_version(),
                    torch=torch.__version__,
                    threads=args.threads,
                    dtype=args.dtype,
                    loadavg_at_end=os.getloadavg(),
                ),
                method="alternating steps of both models in two live processes; medians",
                steps=args.steps,
                rows=rows,
            ),
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
