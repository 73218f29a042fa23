"""What every engine is built with: the device, the inner AdamW's hyper-parameters, clipping and
accumulation, and the facility's engine options (from `[[facility]]` in the run config)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mpifed.config import DeepSpeedConfig, FsdpConfig


@dataclass(frozen=True)
class EngineSettings:
    device: torch.device = torch.device("cpu")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    """Clip the global gradient norm to this; 0: off."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the length of the list `train_step` receives)."""
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        if self.grad_accum < 1 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"invalid engine settings: {self}")

    def adamw(self, params: list) -> torch.optim.AdamW:
        """The inner optimizer; its learning rate is set at every step by the schedule."""
        return torch.optim.AdamW(params, lr=0.0, betas=self.betas, weight_decay=self.weight_decay)
