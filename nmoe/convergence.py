"""Early stopping: a patience rule on a validation score (higher is better)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Patience:
    """Stop after `patience` steps without the score beating the best by more than `min_delta`
    (patience 0: never stop early). `best_step` is the step whose state to keep."""

    patience: int
    min_delta: float = 0.0
    best: float = float("-inf")
    best_step: int = 0
    waited: int = 0
    history: list[float] = field(default_factory=list)

    def update(self, step: int, score: float) -> bool:
        """Record `score` at `step`; True if it is the new best."""
        self.history.append(score)
        if score > self.best + self.min_delta or self.best_step == 0:
            self.best, self.best_step, self.waited = score, step, 0
            return True
        self.waited += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.waited >= self.patience

    def as_dict(self) -> dict[str, Any]:
        """The rule's state for a checkpoint, the validation history included."""
        return {
            "best": self.best,
            "best_step": self.best_step,
            "waited": self.waited,
            "history": list(self.history),
        }

    @classmethod
    def restore(cls, patience: int, min_delta: float, saved: dict[str, Any]) -> Patience:
        """The rule as `as_dict` saved it (a checkpoint of an earlier version has no history:
        it restarts empty)."""
        return cls(
            patience,
            min_delta,
            float(saved["best"]),
            int(saved["best_step"]),
            int(saved["waited"]),
            [float(v) for v in saved.get("history", [])],
        )
