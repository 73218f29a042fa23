"""The flat layout: every trainable parameter of the model at a fixed offset of one fp32 vector, with a
fingerprint. It is the one order that engines, the federation and checkpoints share: an engine says
which ranges of it a rank holds, the federation reduces ranges, a checkpoint stores them per parameter.
No torch here (a model is only asked for its named parameters), so file tools can read layouts cheaply.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

if TYPE_CHECKING:
    import torch

View = tuple[int, np.ndarray]
"""(offset in the flat layout, fp32 values): a range of the layout as one rank holds it."""


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's place in the layout: its name, shape, dtype (as torch names it) and offset."""

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
    def of(cls, model: "torch.nn.Module") -> "FlatLayout":
        """The layout of `model`'s trainable parameters (any device, the meta device included)."""
        return cls.from_parameters((name, tuple(p.shape), str(p.dtype).removeprefix("torch."))
                                   for name, p in model.named_parameters() if p.requires_grad)

    @classmethod
    def from_parameters(cls, params: Iterable[tuple[str, tuple[int, ...], str]]) -> "FlatLayout":
        """The layout of (name, shape, dtype) triples, in the order given."""
        slots, offset = [], 0
        for name, shape, dtype in params:
            slots.append(ParamSlot(name, tuple(shape), dtype, offset))
            offset += slots[-1].numel
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
