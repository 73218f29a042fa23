"""Local training engines: how a facility trains its copy of the model between synchronisations.
Each maps its (possibly sharded) parameters onto the one flat layout the federation works on."""
from __future__ import annotations

import torch

from mpifed.engines.base import Engine, FlatLayout
from mpifed.engines.settings import EngineSettings

__all__ = ["Engine", "EngineSettings", "FlatLayout", "make_engine"]


def make_engine(name: str, model: torch.nn.Module, settings: EngineSettings, micro_batch: int) -> Engine:
    """The engine called `name` over the current torch.distributed process group (the facility)."""
    if name == "replica":
        from mpifed.engines.replica import ReplicaEngine

        return ReplicaEngine(model, settings)
    if name == "fsdp":
        from mpifed.engines.fsdp import FsdpEngine

        return FsdpEngine(model, settings)
    if name == "deepspeed":
        from mpifed.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, settings, micro_batch)
    raise ValueError(f"unknown engine {name!r}; choose replica, fsdp or deepspeed")
