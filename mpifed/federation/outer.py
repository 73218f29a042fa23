"""Outer optimizers: the update a root applies to its segment of the global model, given the
facilities' token-weighted average pseudo-gradient Δ = θ_global − θ_local. State, where an optimizer
has any, lives only on the roots and only for their own segment."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class OuterOptimizer(Protocol):
    def step(self, theta: np.ndarray, delta: np.ndarray) -> None:
        """Update `theta` (one segment of the global model) in place from the averaged `delta`."""
        ...


class FedAvg:
    """θ ← θ − lr·Δ. With lr = 1 the new global model is the token-weighted mean of the facilities'."""

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = np.float32(lr)

    def step(self, theta: np.ndarray, delta: np.ndarray) -> None:
        if self.lr == 1:
            np.subtract(theta, delta, out=theta)
        else:
            theta -= self.lr * delta


def make_outer(name: str) -> OuterOptimizer:
    if name == "fedavg":
        return FedAvg()
    raise ValueError(f"unknown outer optimizer {name!r}")
