"""Logging of the one-process command-line tools (export, evaluate, generate): our records on stderr, the
stack's chatter (megatron, torch.distributed, UserWarning/FutureWarning) silenced."""

from __future__ import annotations

import logging
import sys
import warnings


def setup_cli_logging(quiet: bool = False) -> None:
    """INFO records on stderr (WARNING with ``quiet``, e.g. when stdout carries one JSON line)."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
