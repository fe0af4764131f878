"""Training guards: skip steps with a non-finite loss or gradient; roll back on a loss spike.

- Non-finite: when the global loss or the global gradient norm is NaN/inf, the optimizer step and the
  expert-bias update are skipped (gradients dropped), the step is counted in ``skipped_total`` and logged.
  More than ``train.max_consecutive_skips`` in a row aborts the run with an error (the model is broken, a
  checkpoint rollback would not help).
- Spike: with ``train.spike_threshold > 0``, a finite loss above ``spike_threshold`` x the mean of the last
  ``train.spike_window`` accepted losses (once that many exist) triggers a rollback to the last checkpoint.
  The data loader keeps its position, so the batches that caused the spike are not replayed (PaLM-style);
  at most ``train.max_rollbacks`` rollbacks per process.
Both decisions use globally reduced values, so every rank decides the same.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any


class NonFiniteError(RuntimeError):
    pass


class Guards:
    def __init__(
        self,
        spike_threshold: float = 0.0,
        spike_window: int = 20,
        max_consecutive_skips: int = 10,
        max_rollbacks: int = 3,
    ) -> None:
        self.spike_threshold = spike_threshold
        self.window: deque[float] = deque(maxlen=max(1, spike_window))
        self.max_consecutive_skips = max_consecutive_skips
        self.max_rollbacks = max_rollbacks
        self.skipped_total = 0
        self.consecutive = 0
        self.rollbacks = 0

    @staticmethod
    def finite(*values: float) -> bool:
        return all(math.isfinite(v) for v in values)

    def check_nonfinite(self, loss: float, grad_norm: float, step: int) -> bool:
        """True = skip this step. Raises NonFiniteError after too many consecutive skips."""
        if self.finite(loss, grad_norm):
            self.consecutive = 0
            return False
        self.skipped_total += 1
        self.consecutive += 1
        if self.consecutive > self.max_consecutive_skips:
            raise NonFiniteError(
                f"step {step}: {self.consecutive} consecutive steps with a non-finite loss or "
                f"gradient (loss={loss}, grad_norm={grad_norm}); lower train.lr or resume from "
                f"an earlier checkpoint (checkpoint.load=...)"
            )
        return True

    def is_spike(self, loss: float) -> bool:
        """True = roll back. Call for accepted (finite) steps only; records the loss otherwise."""
        if (
            self.spike_threshold > 0
            and len(self.window) == self.window.maxlen
            and loss > self.spike_threshold * (sum(self.window) / len(self.window))
            and self.rollbacks < self.max_rollbacks
        ):
            self.rollbacks += 1
            return True
        self.window.append(loss)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive, "window": list(self.window)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.skipped_total = int(sd.get("skipped_total", 0))
        self.consecutive = int(sd.get("consecutive", 0))
        self.window.clear()
        self.window.extend(float(x) for x in sd.get("window", []))
