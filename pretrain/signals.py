"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary, then a requeue exit.

Slurm sends SIGUSR1 before the time limit (``--signal=USR1@N`` with srun, ``B:USR1@N`` with ``exec``) and
SIGTERM on preemption or ``scancel``; torchrun forwards SIGTERM to its workers. The handler only sets a
flag: the trainer checks it once per step, agrees with the other ranks (an all-reduce, so a signal that
reached one rank stops all of them at the same step), saves a checkpoint, writes
``<run.dir>/preempted.json`` and exits with ``run.preempt_exit_code`` (default 75, EX_TEMPFAIL), which the
Slurm template turns into ``scontrol requeue`` (or list it in slurm.conf ``RequeueExit``). Rerunning the
same command resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Installs the handlers on ``install()``; ``requested()`` is collective when ``group`` is given."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        for s in PREEMPT_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            log.warning(
                "received %s: checkpointing at the next step boundary, then exiting for requeue",
                signal.Signals(signum).name,
            )
        self.signum = signum

    def requested(self, collective: bool = True) -> bool:
        flag = self.signum is not None
        if collective and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([1 if flag else 0], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
