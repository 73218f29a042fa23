"""The replica engine: every rank of the facility holds the whole model; gradients are averaged over
the facility's process group with one all-reduce of a flat buffer (also the single-rank case).

Parameters and gradients live as views of two flat fp32 buffers, so the federation reads and writes
the model with zero copies (on the CPU) and the all-reduce needs no packing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mpifed.engines.base import Pieces, TensorBatch, TorchOptimizerEngine, lm_inputs, on_meta, rebind
from mpifed.engines.settings import EngineSettings
from mpifed.layout import FlatLayout


class ReplicaEngine(TorchOptimizerEngine):
    """The whole model on every rank, parameters and gradients as views of two flat buffers; one
    all-reduce per step. Each rank owns an even 1/n share of the layout for the reduction."""

    def __init__(self, model: torch.nn.Module, settings: EngineSettings, micro_batch: int) -> None:
        self.layout = FlatLayout.of(model)
        self.settings = settings
        empty = on_meta(model)  # built empty: the flat buffer is the parameters' first storage
        params = [p for p in model.parameters() if p.requires_grad]
        kind = dict(dtype=params[0].dtype, device=settings.device)
        self._flat = torch.empty(self.layout.numel, **kind)
        # One extra slot at the end carries the loss in the same all-reduce as the gradient.
        self._reduced = torch.zeros(self.layout.numel + 1, **kind)
        self._grad = self._reduced[:-1]
        for slot, param in zip(self.layout.slots, params):
            view = slice(slot.offset, slot.offset + slot.numel)
            if empty:  # a meta parameter cannot take storage: put a real one in its place
                rebind(model, param, torch.nn.Parameter(self._flat[view].view(slot.shape)))
            else:
                self._flat[view].copy_(param.detach().reshape(-1).to(settings.device))
                param.data = self._flat[view].view(slot.shape)
        params = [p for p in model.parameters() if p.requires_grad]
        for slot, param in zip(self.layout.slots, params):
            param.grad = self._grad[slot.offset:slot.offset + slot.numel].view(slot.shape)
        self._model = self._forward = model.to(settings.device)  # the buffers (the parameters are there)
        self._optimizer = settings.inner(params)
        self._param_places = [(p, 0, slot.offset) for slot, p in zip(self.layout.slots, params)]
        self._params = params
        self._size, rank = settings.ranks, settings.rank
        self._held = Pieces([(0, self._flat)])
        self._owned = self._held.share(rank, self._size, self.layout.numel)

    def model(self) -> torch.nn.Module:
        return self._model

    def train_step(self, batches: list[TensorBatch], lr: float) -> float:
        self._model.train()
        self._reduced.zero_()
        loss_sum = 0.0
        for batch in batches:  # gradients accumulate in the flat buffer; one all-reduce per step
            loss = self._model(**lm_inputs(batch, self.settings.device)).loss / len(batches)
            loss.backward()
            loss_sum += loss.detach()
        self._reduced[-1] = loss_sum
        if self._size > 1:  # a one-rank facility has nothing to average
            dist.all_reduce(self._reduced, group=self.settings.group)
            self._reduced /= self._size
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.settings.grad_clip)
        self.set_lr(lr)
        self._optimizer.step()
        return float(self._reduced[-1])

