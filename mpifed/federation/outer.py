"""Outer optimizers: the update a root applies to its segment of the global model, given the facilities'
token-weighted mean pseudo-gradient Δ = θ_global − θ_local (a descent direction, like a gradient).
State lives only on the roots and only for their own segment; every root of a segment applies the
same update to the same state, so the global model stays identical everywhere.

  fedavg   θ ← θ − η·Δ                                      (McMahan et al. 2017; η = 1: the weighted mean)
  fedavgm  m ← μ·m + Δ;  θ ← θ − η·m                        (Hsu et al. 2019)
  diloco   m ← μ·m + Δ;  θ ← θ − η·(Δ + μ·m)                (Nesterov SGD; Douillard et al. 2023)
  fedadam  m ← β1·m + (1−β1)·Δ;  v ← β2·v + (1−β2)·Δ²;  θ ← θ − η·m / (√v + τ)
  fedyogi  as fedadam with  v ← v − (1−β2)·Δ²·sign(v − Δ²)  (Reddi et al. 2021, no bias correction)

Warm-up (fedavgm, diloco; federation.outer_warmup = N): outer step k (1-based) uses
  w = min(1, (k − 1)/N),  η_k = 1 + (η − 1)·w,  μ_k = μ·w
so step 1 is plain FedAvg (the facilities' mean model) and step N + 1 on uses η and μ; the momentum
builds up only once the facilities' updates are worth extrapolating.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpifed.config import OuterName, check_table


@dataclass(frozen=True)
class OuterSpec:
    """An outer optimizer's defaults: its learning rate, its momentum (β1 for the Adam kinds), and the
    names of the state arrays it keeps per value of the segment."""

    lr: float
    momentum: float
    state: tuple[str, ...]


OUTER: dict[str, OuterSpec] = {
    "fedavg": OuterSpec(1.0, 0.0, ()),
    "fedavgm": OuterSpec(1.0, 0.9, ("momentum",)),
    "diloco": OuterSpec(0.7, 0.9, ("momentum",)),
    "fedadam": OuterSpec(0.01, 0.9, ("m", "v")),
    "fedyogi": OuterSpec(0.01, 0.9, ("m", "v")),
}
check_table(OUTER, OuterName, "mpifed.federation.outer.OUTER")


@dataclass
class OuterOptimizer:
    """One outer optimizer over one segment; `state` maps names to arrays shaped like the segment."""

    kind: OuterName
    lr: float
    momentum: float
    beta2: float = 0.99
    tau: float = 1e-3
    warmup: int = 0
    """Outer steps over which lr and momentum move from FedAvg's (1, 0) to theirs (momentum kinds)."""
    steps: int = 0
    """Outer steps taken so far (restored on resume: the checkpoint's round)."""

    def __post_init__(self) -> None:
        if self.kind not in OUTER:
            raise ValueError(f"unknown outer optimizer {self.kind!r}; choose one of {', '.join(OUTER)}")
        self.state: dict[str, np.ndarray] = {}

    def _buffer(self, name: str, like: np.ndarray) -> np.ndarray:
        if name not in self.state:
            self.state[name] = np.zeros_like(like)
        return self.state[name]

    @property
    def state_names(self) -> list[str]:
        return list(OUTER[self.kind].state)

    def full_state(self, like: np.ndarray) -> dict[str, np.ndarray]:
        """Every state array, zeros before the first step (for checkpoints)."""
        return {name: self._buffer(name, like) for name in self.state_names}

    def schedule(self, step: int) -> tuple[float, float]:
        """(lr, momentum) of 1-based outer step `step`, after the warm-up (see the module docstring)."""
        if not self.warmup or self.kind not in ("fedavgm", "diloco"):
            return self.lr, self.momentum
        w = min(1.0, (step - 1) / self.warmup)
        return 1.0 + (self.lr - 1.0) * w, self.momentum * w

    def step(self, theta: np.ndarray, delta: np.ndarray, at: slice | None = None, number: int | None = None) -> None:
        """Update `theta` in place from the averaged `delta` (may be overwritten as scratch). With `at`,
        theta and delta are the segment's values `at` (a fragment) and the state is sliced alike;
        `number` is the 1-based outer step of those values (default: the next of `steps`)."""
        if number is None:
            self.steps += 1
            number = self.steps
        lr, mu = (np.float32(v) for v in self.schedule(number))
        if self.kind == "fedavg":
            theta -= lr * delta if lr != 1 else delta
            return
        # a fragment's values `at`: the state was made for the whole segment (full_state) beforehand
        state = self.full_state(theta) if at is None else {name: self.state[name][at] for name in self.state_names}
        self._step_with_state(theta, delta, lr, mu, state)

    def _step_with_state(self, theta: np.ndarray, delta: np.ndarray, lr: np.float32, mu: np.float32,
                         state: dict[str, np.ndarray]) -> None:
        if self.kind in ("fedavgm", "diloco"):
            m = state["momentum"]
            m *= mu
            m += delta
            if self.kind == "diloco":
                delta += mu * m  # Nesterov: step along Δ + μ·m
                theta -= lr * delta
            else:
                theta -= lr * m
        else:
            m, v = state["m"], state["v"]
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


def make_outer(kind: OuterName, lr: float | None = None, momentum: float | None = None, beta2: float = 0.99,
               tau: float = 1e-3, warmup: int = 0) -> OuterOptimizer:
    """The named optimizer; lr and momentum default to its `OUTER` entry."""
    spec = OUTER[kind]
    return OuterOptimizer(kind, spec.lr if lr is None else lr, spec.momentum if momentum is None else momentum,
                          beta2, tau, warmup)
