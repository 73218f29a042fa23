"""Local training engines: how a facility trains its copy of the model between synchronisations.
Each maps its (possibly sharded) parameters onto the one flat layout the federation works on."""
from __future__ import annotations

import importlib

import torch

from mpifed.config import EngineName, check_table
from mpifed.engines.base import Engine
from mpifed.engines.settings import EngineSettings

__all__ = ["Engine", "EngineSettings", "make_engine"]

# engine name -> (module, class); imported only when chosen (DeepSpeed is heavy and optional)
_ENGINES: dict[str, tuple[str, str]] = {
    "replica": ("mpifed.engines.replica", "ReplicaEngine"),
    "fsdp": ("mpifed.engines.fsdp", "FsdpEngine"),
    "deepspeed": ("mpifed.engines.deepspeed", "DeepSpeedEngine"),
}
check_table(_ENGINES, EngineName, "mpifed.engines")


def make_engine(name: EngineName, model: torch.nn.Module, settings: EngineSettings, micro_batch: int) -> Engine:
    """The engine called `name` over the facility's process group in `settings`."""
    module, cls = _ENGINES[name]
    return getattr(importlib.import_module(module), cls)(model, settings, micro_batch)
