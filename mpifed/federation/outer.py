"""Outer optimizers: the update a root applies to its segment of the global model, given the facilities'
token-weighted mean pseudo-gradient Δ = θ_global − θ_local (a descent direction, like a gradient).
State lives only on the roots and only for their own segment; every root of a segment applies the
same update to the same state, so the global model stays identical everywhere.

  fedavg   θ ← θ − η·Δ                                      (McMahan et al. 2017; η = 1: the weighted mean)
  fedavgm  m ← μ·m + Δ;  θ ← θ − η·m                        (Hsu et al. 2019)
  diloco   m ← μ·m + Δ;  θ ← θ − η·(Δ + μ·m)                (Nesterov SGD; Douillard et al. 2023)
  fedadam  m ← β1·m + (1−β1)·Δ;  v ← β2·v + (1−β2)·Δ²;  θ ← θ − η·m / (√v + τ)
  fedyogi  as fedadam with  v ← v − (1−β2)·Δ²·sign(v − Δ²)  (Reddi et al. 2021, no bias correction)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_LR = {"fedavg": 1.0, "fedavgm": 1.0, "diloco": 0.7, "fedadam": 0.01, "fedyogi": 0.01}
DEFAULT_MOMENTUM = {"fedavg": 0.0, "fedavgm": 0.9, "diloco": 0.9, "fedadam": 0.9, "fedyogi": 0.9}
STATE_NAMES = {"fedavg": [], "fedavgm": ["momentum"], "diloco": ["momentum"], "fedadam": ["m", "v"],
               "fedyogi": ["m", "v"]}


@dataclass
class OuterOptimizer:
    """One outer optimizer over one segment; `state` maps names to arrays shaped like the segment."""

    kind: str
    lr: float
    momentum: float
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_LR:
            raise ValueError(f"unknown outer optimizer {self.kind!r}; choose one of {', '.join(DEFAULT_LR)}")
        self.state: dict[str, np.ndarray] = {}

    def _buffer(self, name: str, like: np.ndarray) -> np.ndarray:
        if name not in self.state:
            self.state[name] = np.zeros_like(like)
        return self.state[name]

    @property
    def state_names(self) -> list[str]:
        return STATE_NAMES[self.kind]

    def full_state(self, like: np.ndarray) -> dict[str, np.ndarray]:
        """Every state array, zeros before the first step (for checkpoints)."""
        return {name: self._buffer(name, like) for name in self.state_names}

    def step(self, theta: np.ndarray, delta: np.ndarray) -> None:
        """Update `theta` in place from the averaged `delta` (may be overwritten as scratch)."""
        lr, mu = np.float32(self.lr), np.float32(self.momentum)
        if self.kind == "fedavg":
            theta -= lr * delta if lr != 1 else delta
        elif self.kind in ("fedavgm", "diloco"):
            m = self._buffer("momentum", theta)
            m *= mu
            m += delta
            if self.kind == "diloco":
                delta += mu * m  # Nesterov: step along Δ + μ·m
                theta -= lr * delta
            else:
                theta -= lr * m
        else:
            m, v = self._buffer("m", theta), self._buffer("v", theta)
            b2 = np.float32(self.beta2)
            m *= mu
            m += (1 - mu) * delta
            square = delta * delta
            if self.kind == "fedadam":
                v *= b2
                v += (1 - b2) * square
            else:
                v -= (1 - b2) * square * np.sign(v - square)
            theta -= lr * m / (np.sqrt(v) + np.float32(self.tau))


def make_outer(kind: str, lr: float | None = None, momentum: float | None = None, beta2: float = 0.99,
               tau: float = 1e-3) -> OuterOptimizer:
    """The named optimizer; lr and momentum default to the values in DEFAULT_LR / DEFAULT_MOMENTUM."""
    if kind not in DEFAULT_LR:
        raise ValueError(f"unknown outer optimizer {kind!r}; choose one of {', '.join(DEFAULT_LR)}")
    return OuterOptimizer(kind, DEFAULT_LR[kind] if lr is None else lr,
                          DEFAULT_MOMENTUM[kind] if momentum is None else momentum, beta2, tau)
