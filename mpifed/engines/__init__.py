"""Local training engines: how a facility trains its copy of the model between synchronisations."""
from __future__ import annotations

from mpifed.engines.base import Engine, FlatLayout

__all__ = ["Engine", "FlatLayout", "make_engine"]


def make_engine(name: str, model, lr: float, weight_decay: float) -> Engine:
    """The engine called `name` (validated in the config), over the facility's process group."""
    if name == "replica":
        from mpifed.engines.replica import ReplicaEngine

        return ReplicaEngine(model, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown engine {name!r}")
