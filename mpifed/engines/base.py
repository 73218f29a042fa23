"""The `Engine` protocol that every local training engine implements, and what engines share: `Pieces`
(the ranges of the flat layout a rank holds, as arrays the federation reads and writes) and the
AdamW state kept in layout order.

Federation only ever sees ranges of the flat layout (mpifed.layout); that is what lets facilities run
different engines.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from mpifed.layout import FlatLayout, View

if TYPE_CHECKING:
    from mpifed.engines.settings import EngineSettings


TensorBatch = "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"
"""Token ids [n, L] (predicting the ids themselves), or (ids, labels) with -100 where no loss is taken."""


def lm_inputs(batch: TensorBatch, device: torch.device) -> dict[str, torch.Tensor]:
    """The causal-LM keyword arguments for a batch, on `device`."""
    ids, labels = batch if isinstance(batch, tuple) else (batch, batch)
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")
"""AdamW's state arrays (besides its step count)."""
STATE_KEYS = (*OPTIMIZER_KEYS, "momentum_buffer")
"""Every inner optimizer's state arrays, shaped like the parameters: AdamW's, SGD's momentum."""


class Pieces:
    """The ranges of the flat layout one rank holds, as 1-D tensors in the engine's own storage, and
    the fp32 numpy arrays the federation reads and writes. Where a tensor is CPU fp32 the array is the
    same memory (no copies); otherwise (a GPU, bf16) it is a host copy that `pull` refreshes from the
    engine and `push` writes back."""

    def __init__(self, pieces: list[tuple[int, torch.Tensor]], staged: bool | None = None) -> None:
        self.tensors = [t.detach() for _, t in pieces]
        if staged is None:
            staged = any(t.device.type != "cpu" or t.dtype != torch.float32 for t in self.tensors)
        self.staged = staged
        pin = staged and torch.cuda.is_available()
        self.views: list[View] = [
            (offset, torch.empty(t.numel(), dtype=torch.float32, pin_memory=pin).numpy() if staged else t.numpy())
            for (offset, _), t in zip(pieces, self.tensors)]
        self.pull()

    def pull(self) -> None:
        if self.staged:
            for (_, host), t in zip(self.views, self.tensors):
                host[:] = t.float().cpu().numpy()

    def push(self) -> None:
        if self.staged:
            for (_, host), t in zip(self.views, self.tensors):
                t.copy_(torch.from_numpy(host), non_blocking=False)

    def share(self, rank: int, size: int, numel: int) -> list[View]:
        """The views clipped to this rank's even share [numel·rank/size, numel·(rank+1)/size) of the
        layout: how engines whose ranks all hold everything split the work of the reduction."""
        lo, hi = numel * rank // size, numel * (rank + 1) // size
        return [(max(offset, lo), values[max(offset, lo) - offset:min(offset + len(values), hi) - offset])
                for offset, values in self.views if max(offset, lo) < min(offset + len(values), hi)]


class Engine:
    """A facility's local training engine, as the trainer and the federation see it.

    The federation only touches `owned()` (the disjoint ranges this rank contributes; together a
    facility's ranks cover the layout) and `held()` (what it receives back). `before_exchange` makes
    them current; `after_exchange` loads the new global values into the engine. Optimizer state moves
    in and out in layout order, so a checkpoint does not depend on the engine or facility size.
    """

    layout: FlatLayout
    settings: "EngineSettings"
    _forward: torch.nn.Module
    """What the engine runs the model's forward through."""
    _held: Pieces
    _owned: list[View]

    def train_step(self, batches: list[TensorBatch], lr: float) -> float:
        """One inner optimizer step over `batches` (accumulated micro-batches) at learning rate `lr`;
        returns the facility-mean loss."""
        raise NotImplementedError

    @torch.no_grad()
    def loss(self, batch: TensorBatch) -> float:
        """Mean loss of the current model on `batch` (no gradients). Sharded engines need every rank of
        the facility to call this in lockstep."""
        self._forward.eval()
        return float(self._forward(**lm_inputs(batch, self.settings.device)).loss)

    def owned(self) -> list[View]:
        return self._owned

    def held(self) -> list[View]:
        return self._held.views

    def before_exchange(self) -> None:
        self._held.pull()

    def after_exchange(self) -> None:
        self._held.push()

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The inner optimizer's state over the owned ranges, concatenated in `owned()` order: AdamW's
        {"step": [n], "exp_avg": ..., "exp_avg_sq": ...}, SGD's {"momentum_buffer": ...} (none without
        momentum); empty before the first step. Collective over the facility for some engines."""
        raise NotImplementedError

    def load_optimizer_state(self, flat: dict[str, np.ndarray]) -> None:
        """Restore from full-layout arrays ("step", where there is one, has one value). Collective over
        the facility."""
        raise NotImplementedError

    def reset_optimizer(self) -> None:
        raise NotImplementedError

    def owned_pieces(self, concatenated: np.ndarray) -> list[View]:
        """An array concatenated over the owned ranges (as `optimizer_state` gives them), cut back into
        (offset, values) pieces."""
        pieces, at = [], 0
        for offset, values in self._owned:
            pieces.append((offset, concatenated[at:at + len(values)]))
            at += len(values)
        return pieces

    def _owned_in_held(self) -> list[tuple[int, int, int]]:
        """(held index, start, stop) of each owned view inside the held views."""
        out = []
        for offset, values in self._owned:
            for i, (h, held) in enumerate(self.held()):
                if h <= offset and offset + len(values) <= h + len(held):
                    out.append((i, offset - h, offset - h + len(values)))
                    break
        return out

    def _select_owned(self, held_arrays: list[np.ndarray]) -> np.ndarray:
        parts = [held_arrays[i][a:b] for i, a, b in self._owned_in_held()]
        return np.concatenate(parts) if parts else np.empty(0, np.float32)


def on_meta(model: torch.nn.Module) -> bool:
    """Whether `model` was built with its parameters on the meta device (mpifed.model.parameters_on_meta)."""
    return any(p.device.type == "meta" for p in model.parameters())


def materialise(model: torch.nn.Module, device: torch.device) -> None:
    """Storage on `device` for every parameter of `model` (uninitialised: the start or a checkpoint fills
    it), keeping the buffers' values (rotary tables), which `to_empty` would drop."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])


def rebind(model: torch.nn.Module, old: torch.nn.Parameter, new: torch.nn.Parameter) -> None:
    """Put `new` wherever `old` is registered in `model` (tied weights: in every module that shares it)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is old:
                module._parameters[name] = new


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a tensor (a DTensor's shard; a plain tensor itself)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class TorchOptimizerEngine(Engine):
    """Engines that drive a torch.optim.AdamW over their (possibly sharded) parameters themselves: the
    state lives in `optimizer.state[param]`, shaped like each parameter's local part. `_param_places`
    says where each parameter's local part sits in the held views: (param, held index, start)."""

    _optimizer: torch.optim.Optimizer
    _param_places: list[tuple[torch.nn.Parameter, int, int]]

    def set_lr(self, lr: float) -> None:
        for group in self._optimizer.param_groups:
            group["lr"] = lr

    def reset_optimizer(self) -> None:
        self._optimizer.state.clear()

    def optimizer_state(self) -> dict[str, np.ndarray]:
        first = self._optimizer.state.get(self._param_places[0][0]) if self._param_places else None
        if not first:
            return {}
        out = {"step": np.array([float(first["step"])], np.float32)} if "step" in first else {}
        for key in (k for k in STATE_KEYS if torch.is_tensor(first.get(k))):
            held = [np.empty(len(values), np.float32) for _, values in self.held()]
            for param, i, start in self._param_places:
                values = local(self._optimizer.state[param][key]).detach().reshape(-1).float().cpu().numpy()
                held[i][start:start + len(values)] = values
            out[key] = self._select_owned(held)
        return out

    def load_optimizer_state(self, flat: dict[str, np.ndarray]) -> None:
        if not flat:
            return
        views = self.held()
        for param, i, start in self._param_places:
            offset = views[i][0] + start
            entry = {"step": torch.tensor(float(flat["step"][0]), dtype=torch.float32)} if "step" in flat else {}
            for key in (k for k in STATE_KEYS if k in flat):
                state = torch.zeros_like(param)
                part = local(state)
                part.copy_(torch.from_numpy(flat[key][offset:offset + part.numel()].copy()).view(part.shape))
                entry[key] = state
            self._optimizer.state[param] = entry
