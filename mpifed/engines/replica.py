"""The replica engine: every rank of the facility holds the whole model; gradients are averaged over
the facility's process group with one all-reduce of a flat buffer.

Parameters and gradients live as views of two flat fp32 buffers, so the federation reads and writes
the model with zero copies and the all-reduce needs no packing.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from mpifed.engines.base import FlatLayout


class ReplicaEngine:
    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float) -> None:
        self._model = model
        self.layout = FlatLayout.of(model)
        self._params = params = [p for p in model.parameters() if p.requires_grad]
        self._flat = torch.empty(self.layout.numel, dtype=torch.float32)
        # One extra slot at the end carries the loss in the same all-reduce as the gradient.
        self._reduced = torch.zeros(self.layout.numel + 1, dtype=torch.float32)
        self._grad = self._reduced[:-1]
        for slot, param in zip(self.layout.slots, params):
            view = slice(slot.offset, slot.offset + slot.numel)
            self._flat[view].copy_(param.detach().reshape(-1))
            param.data = self._flat[view].view(slot.shape)
            param.grad = self._grad[view].view(slot.shape)
        self._optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self._size = dist.get_world_size()
        self._rank = dist.get_rank()

    def model(self) -> torch.nn.Module:
        return self._model

    def train_step(self, batch: torch.Tensor) -> float:
        self._model.train()
        self._reduced.zero_()
        loss = self._model(input_ids=batch, labels=batch).loss
        loss.backward()
        self._reduced[-1] = loss.detach()
        dist.all_reduce(self._reduced)
        self._reduced /= self._size
        self._optimizer.step()
        return float(self._reduced[-1])

    def state(self) -> dict[str, np.ndarray]:
        """The inner AdamW state as flat arrays in layout order (identical on every rank of a facility)."""
        states = [self._optimizer.state.get(p, {}) for p in self._params]
        if not states[0]:
            return {}
        flat = {key: np.concatenate([s[key].detach().reshape(-1).numpy() for s in states])
                for key in ("exp_avg", "exp_avg_sq")}
        flat["step"] = np.array([float(states[0]["step"])], np.float32)
        return flat

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if not state:
            return
        for slot, param in zip(self.layout.slots, self._params):
            piece = slice(slot.offset, slot.offset + slot.numel)
            self._optimizer.state[param] = {
                "step": torch.tensor(float(state["step"][0]), dtype=torch.float32),
                **{key: torch.from_numpy(state[key][piece].copy()).view(slot.shape) for key in ("exp_avg", "exp_avg_sq")}}

    def _range(self) -> tuple[int, int]:
        n = self.layout.numel
        return n * self._rank // self._size, n * (self._rank + 1) // self._size

    def owned(self) -> list[tuple[int, np.ndarray]]:
        start, stop = self._range()
        return [(start, self._flat.numpy()[start:stop])]

    def held(self) -> list[tuple[int, np.ndarray]]:
        return [(0, self._flat.numpy())]
