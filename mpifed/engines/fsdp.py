"""The fsdp engine: PyTorch FSDP2 (`fully_shard`) on every decoder layer and on the root, over the
facility's process group; HSDP with `fsdp.replicas = k` (shard inside groups of size/k ranks,
replicate across the k groups); optional bf16 mixed precision, activation checkpointing, CPU offload.

FSDP2 shards every parameter on dim 0 (in chunks of ceil(rows/shards) rows), so this rank's local
shard of a parameter is one contiguous range of the flat layout: those shards are what it holds, and
(in the first replica group) what it owns. A model built with its parameters on the meta device is
sharded first and then given storage for the local shards alone: no rank ever holds the whole model.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from mpifed.engines.base import Pieces, TensorBatch, TorchOptimizerEngine, lm_inputs, local, materialise, on_meta
from mpifed.engines.settings import EngineSettings
from mpifed.layout import FlatLayout
from mpifed.model import decoder_layers


class FsdpEngine(TorchOptimizerEngine):
    """PyTorch FSDP2 over the facility's group: each rank holds (and, in the first replica group, owns)
    its dim-0 shard of every parameter; torch's AdamW steps the plain local shards."""

    def __init__(self, model: torch.nn.Module, settings: EngineSettings, micro_batch: int) -> None:
        opts, device = settings.fsdp, settings.device
        self.layout = FlatLayout.of(model)
        self.settings = settings
        size = settings.ranks
        if opts.cpu_offload and device.type != "cuda":
            raise ValueError("fsdp.cpu_offload needs a GPU (parameters on the CPU are already in host memory)")
        if opts.replicas == 1:
            mesh = DeviceMesh.from_group(settings.group, device.type, mesh_dim_names=("shard",))
        else:  # HSDP's 2-D mesh is cut from the default group, which mpifed makes the facility's own
            if settings.group is not dist.group.WORLD:
                raise ValueError("fsdp.replicas > 1 needs the facility's process group to be torch's default group")
            mesh = init_device_mesh(device.type, (opts.replicas, size // opts.replicas),
                                    mesh_dim_names=("replicate", "shard"))
        if opts.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if opts.mixed_precision == "bf16" else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy() if opts.cpu_offload else OffloadPolicy()
        empty = on_meta(model)
        if not empty:
            model.to(device)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=precision, offload_policy=offload)
        fully_shard(model, mesh=mesh, mp_policy=precision, offload_policy=offload)
        if empty:  # parameters on the meta device: allocate this rank's shards only (values come later)
            materialise(model, device)
        self._model = self._forward = model
        self._size = size
        self._params = [p for p in model.parameters() if p.requires_grad]
        # AdamW runs on the plain local shards (views of the DTensors' storage), so each of its foreach
        # ops is one kernel instead of a trip through DTensor's dispatcher (measured: ~8% of a step).
        self._shards = [torch.nn.Parameter(local(p).detach(), requires_grad=False) for p in self._params]
        self._optimizer = settings.inner(self._shards)
        shards = size // opts.replicas
        shard_rank = mesh.get_local_rank("shard") if opts.replicas > 1 else mesh.get_local_rank()
        first_replica = opts.replicas == 1 or mesh.get_local_rank("replicate") == 0
        pieces, self._param_places = [], []
        for slot, param, shard in zip(self.layout.slots, self._params, self._shards):
            part = local(param).detach()
            if part.numel() == 0:
                continue
            rows, per_row = slot.shape[0], slot.numel // slot.shape[0]
            first_row = shard_rank * math.ceil(rows / shards)
            if not part.is_contiguous() or part.shape[0] != min(rows - first_row, math.ceil(rows / shards)):
                raise RuntimeError(f"FSDP shard of {slot.name} is not the expected dim-0 chunk "
                                   f"(shape {tuple(part.shape)} at row {first_row} of {rows})")
            self._param_places.append((shard, len(pieces), 0))
            pieces.append((slot.offset + first_row * per_row, part.view(-1)))
        self._held = Pieces(pieces)
        self._owned = self._held.views if first_replica else []

    def model(self) -> torch.nn.Module:
        return self._model

    def before_exchange(self) -> None:
        # A forward without backward (validation) leaves the root's parameters gathered; the next
        # forward would use those stale copies instead of the values the exchange writes into the shards.
        self._model.reshard()
        super().before_exchange()

    def train_step(self, batches: list[TensorBatch], lr: float) -> float:
        self._model.train()
        loss_sum = torch.zeros((), device=self.settings.device)
        for i, batch in enumerate(batches):
            if len(batches) > 1:  # reduce-scatter gradients once, after the last micro-batch
                self._model.set_requires_gradient_sync(i == len(batches) - 1)
            loss = self._model(**lm_inputs(batch, self.settings.device)).loss / len(batches)
            loss.backward()
            loss_sum += loss.detach().float()
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.settings.grad_clip)
        for param, shard in zip(self._params, self._shards):
            shard.grad = local(param.grad) if param.grad is not None else None
        self.set_lr(lr)
        self._optimizer.step()
        for param, shard in zip(self._params, self._shards):
            param.grad = shard.grad = None
        dist.all_reduce(loss_sum, group=self.settings.group)
        return float(loss_sum) / self._size

