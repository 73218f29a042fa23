"""The engine-agnostic view of a model: `FlatLayout` (every parameter at a fixed offset of one flat
fp32 vector, with a fingerprint) and the `Engine` protocol that each local training engine implements.

Federation only ever sees ranges of the flat vector; that is what lets facilities run different engines.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class FlatLayout:
    """Every trainable parameter, in module order, packed into one flat fp32 vector."""

    slots: tuple[ParamSlot, ...]

    def __post_init__(self) -> None:
        offset = 0
        for slot in self.slots:
            if slot.offset != offset:
                raise ValueError(f"parameter {slot.name} at offset {slot.offset}, expected {offset}")
            offset += slot.numel
        if len({s.name for s in self.slots}) != len(self.slots):
            raise ValueError("parameter names in a layout must be unique")

    @classmethod
    def of(cls, model: torch.nn.Module) -> "FlatLayout":
        slots, offset = [], 0
        for name, param in model.named_parameters():
            if param.requires_grad:
                slots.append(ParamSlot(name, tuple(param.shape), str(param.dtype).removeprefix("torch."), offset))
                offset += param.numel()
        return cls(tuple(slots))

    @property
    def numel(self) -> int:
        return self.slots[-1].offset + self.slots[-1].numel if self.slots else 0

    @property
    def fingerprint(self) -> str:
        """sha256 of names, shapes and dtypes: equal layouts are exchangeable, byte for byte."""
        text = ";".join(f"{s.name}:{'x'.join(map(str, s.shape))}:{s.dtype}" for s in self.slots)
        return hashlib.sha256(text.encode()).hexdigest()

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of `flat` shaped as each parameter."""
        return {s.name: flat[s.offset:s.offset + s.numel].reshape(s.shape) for s in self.slots}


class Engine(Protocol):
    """What the trainer and federation need from a local training engine."""

    layout: FlatLayout

    def train_step(self, batch: torch.Tensor) -> float:
        """One inner optimizer step on this rank's micro-batch; returns the facility-mean loss."""
        ...

    def owned(self) -> list[tuple[int, np.ndarray]]:
        """(offset, view) of the flat ranges this rank contributes to the facility reduction; the
        ranges of a facility's ranks are disjoint and cover the layout."""
        ...

    def held(self) -> list[tuple[int, np.ndarray]]:
        """(offset, view) of the flat ranges this rank must receive back after a round."""
        ...

    def model(self) -> torch.nn.Module:
        ...
