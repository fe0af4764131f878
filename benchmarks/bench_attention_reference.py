"""Timing of the PyTorch-reference hybrid attention (V4Attention through ops.dispatch "reference").

    python benchmarks/bench_attention_reference.py [--config tiny] [--seq 128,512] [--batch 2] [--out DIR]

For each layer type (sliding, hca, csa) and, for CSA, each attention mode, it times one forward and one
forward+backward of a V4Attention layer built from the named config (median of a few repetitions, after a
warm-up) on the current device, prints a table and writes ``DIR/bench_attention_reference.json``.
This measures the reference path only; the Triton kernels have their own benchmark (bench_kernels.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    from ops import dispatch
    from pretrain.config import load_config
    from pretrain.model.attention import V4Attention

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--seq", default="128,512")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    cfg = load_config(args.config).model
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dispatch.set_backend("reference")
    cases = [("sliding", "dense"), ("hca", "dense"), ("csa", "dense"), ("csa", "indexer_warmup"), ("csa", "sparse")]
    rows = []
    for S in [int(s) for s in args.seq.split(",")]:
        for layer_type, mode in cases:
            cfg.attention_mode = mode
            torch.manual_seed(0)
            attn = V4Attention(cfg, layer_type, 0).to(dev)
            x = torch.randn(args.batch, S, cfg.hidden_size, device=dev, requires_grad=True)

            def fwd():
                with torch.no_grad():
                    attn(x)

            def fwd_bwd():
                y = attn(x)
                loss = y.float().square().mean()
                if attn.indexer_loss is not None:
                    loss = loss + cfg.indexer_loss_coeff * attn.indexer_loss
                loss.backward()

            rows.append(
                dict(
                    config=args.config,
                    device=str(dev),
                    batch=args.batch,
                    seq=S,
                    layer_type=layer_type,
                    mode=mode,
                    fwd_ms=round(timed(fwd, args.reps), 2),
                    fwd_bwd_ms=round(timed(fwd_bwd, args.reps), 2),
                    threads=torch.get_num_threads(),
                )
            )
    print(f"{'seq':>5} {'layer':>8} {'mode':>15} {'fwd ms':>9} {'fwd+bwd ms':>11}")
    for r in rows:
        print(f"{r['seq']:>5} {r['layer_type']:>8} {r['mode']:>15} {r['fwd_ms']:>9.2f} {r['fwd_bwd_ms']:>11.2f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_attention_reference.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
