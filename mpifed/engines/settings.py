"""What every engine is built with: the facility's torch process group, the device, the inner optimizer
(AdamW or SGD) and its hyper-parameters, clipping and accumulation, and the facility's engine options (from `[[facility]]` in
the run config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mpifed.config import DeepSpeedConfig, FsdpConfig, InnerOptimizer


@dataclass(frozen=True)
class EngineSettings:
    """Everything an engine is built from, passed in explicitly (nothing is read from the environment)."""

    group: Any = None
    """The facility's torch.distributed process group (`comm.topology.start_process_group`); required."""
    device: torch.device = torch.device("cpu")
    optimizer: InnerOptimizer = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's."""
    momentum: float = 0.0
    """SGD's."""
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    """Clip the global gradient norm to this; 0: off."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the length of the list `train_step` receives)."""
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        if self.group is None or self.grad_accum < 1 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"invalid engine settings (an engine needs its facility's process group): {self}")

    @property
    def ranks(self) -> int:
        """The facility's ranks (the process group's size)."""
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        """This rank's place in the facility's process group."""
        return dist.get_rank(self.group)

    def adamw(self, params: list) -> torch.optim.AdamW:
        """The inner AdamW (the deepspeed engine's); its learning rate is set at every step by the schedule."""
        return torch.optim.AdamW(params, lr=0.0, betas=self.betas, weight_decay=self.weight_decay)

    def inner(self, params: list) -> torch.optim.Optimizer:
        """The inner optimizer `optimizer` names; its learning rate is set at every step by the schedule."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.0, momentum=self.momentum, weight_decay=self.weight_decay)
        return self.adamw(params)
