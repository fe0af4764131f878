"""``python -m pretrain --config NAME [section.key=value ...]`` (also under torchrun and srun).

Examples::

    python -m pretrain --config tiny                                   # one process, CPU
    torchrun --nproc_per_node 2 -m pretrain --config tiny parallel.ep=2
    srun python -m pretrain --config flash run.dir=/ckpt/flash        # MASTER_ADDR/PORT from the sbatch

Rerunning the same command with the same ``run.dir`` resumes from its latest valid checkpoint.
Exit status: 0 done; 2 bad config/layout/checkpoint (message on stderr); ``run.preempt_exit_code`` (75)
after a SIGTERM/SIGUSR1 checkpoint (requeue); 1 any other error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m pretrain",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--config",
        required=True,
        help="config name in pretrain/configs (tiny, small, flash, pro) or a path to a YAML file",
    )
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=10 run.dir=runs/x")
    ap.add_argument("--log-level", default=os.environ.get("PRETRAIN_LOG_LEVEL", "INFO"))
    return ap.parse_args(argv)


def _setup_logging(level: str) -> None:
    from parallel.process_groups import launcher_env

    rank = launcher_env()[0]
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("megatron", "torch.distributed", "streaming"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.log_level)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from parallel.process_groups import LayoutError, init_distributed, teardown
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError, load_config

    log = logging.getLogger("pretrain")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        layout = init_distributed(cfg.parallel, cfg.model)
    except LayoutError as e:
        print(f"layout error: {e}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    from pretrain.trainer import Trainer, summary

    ok = False
    try:
        res = Trainer(cfg, layout).fit()
        ok = True
    except (ConfigError, CheckpointError, LayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown(barrier=ok)  # after an error a peer may be blocked in a p2p receive: no barrier
    if layout and int(os.environ.get("RANK", "0")) == 0:
        log.info("summary\n%s", summary(cfg, res))
    return res.exit_code


if __name__ == "__main__":  # the guard matters: dist_checkpointing's save spawns a multiprocessing Manager
    sys.exit(main())
