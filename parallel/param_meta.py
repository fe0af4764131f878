"""Readers of the parameter metadata the model sets (docs/CONTRACTS.md, "Parameter metadata").

The model tags each ``nn.Parameter`` with structural attributes only (what it is, not which optimizer owns it:
that is ``parallel.optimizer_groups.OPTIMIZER_ROUTES``). This module answers the questions every consumer
(optimizers, initialisation, checkpointing, gradient norms, memory accounting) asks of them, in one place.
"""

from __future__ import annotations

import torch


def is_expert_param(p: torch.Tensor) -> bool:
    """A routed-expert weight: ``v4_expert`` (ours) or megatron-core's ``allreduce=False`` (expert parallel:
    never all-reduced over the expert-parallel group)."""
    return bool(getattr(p, "v4_expert", False)) or getattr(p, "allreduce", True) is False
