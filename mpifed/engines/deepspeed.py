"""The deepspeed engine: DeepSpeed ZeRO stage 1, 2 or 3 over the facility's process group (gloo with
DS_ACCELERATOR=cpu on CPUs, NCCL/RCCL on GPUs), with the user's DeepSpeed JSON merged over mpifed's
defaults and torch's AdamW as the optimizer unless that JSON names another.

What a rank holds: with ZeRO 1/2 every rank has the whole model (the parameters are views of
DeepSpeed's flat groups), and the reduction work is split evenly; with ZeRO 3 its partition of every
parameter (`ds_tensor`: elements [r·p, (r+1)·p) with p = ceil(numel/ranks)). After the exchange the
new values go into those tensors and DeepSpeed's fp32 master copy is refreshed from them.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mpifed import cache_dir
from mpifed.engines.base import OPTIMIZER_KEYS, Engine, Pieces, TensorBatch, lm_inputs, on_meta
from mpifed.engines.settings import EngineSettings
from mpifed.layout import FlatLayout
from mpifed.model import ModelError

# mpifed sets these from train.micro_batch and train.grad_accum: a user JSON may not change them.
_OWN_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _real_model(meta: torch.nn.Module, config: dict, group: object, dtype: torch.dtype) -> torch.nn.Module:
    """The architecture of `meta` (built on the meta device) built for real: under ZeRO-3 inside
    `deepspeed.zero.Init`, which partitions each parameter over the facility's ranks as its module is
    created, so no rank ever holds the whole model; whole for ZeRO 1 and 2, which hold it anyway. Its
    values are placeholders: the initial model's values arrive afterwards (Trainer._start)."""
    import deepspeed
    import torch._dynamo  # noqa: F401 - see below
    from transformers import AutoModelForCausalLM

    # zero.Init patches torch.Tensor.__new__ while it is open; torch._dynamo, imported lazily by the
    # modeling code, checks that signature when first imported and refuses the patched one (DeepSpeed
    # 0.19, torch 2.13): it is imported above, before the patch, and the model's module with `meta`.
    if config["zero_optimization"]["stage"] < 3:
        return AutoModelForCausalLM.from_config(meta.config, dtype=dtype)
    # Only the partitioning and precision settings: zero.Init checks batch sizes against a world it
    # counts differently. The dtype comes from the config's bf16/fp16 sections, not `dtype=`: given a
    # dtype, DeepSpeed 0.19 keeps it only where the accelerator supports fp16, and on a CPU without
    # fp16 kernels it builds bf16 partitions of an fp32 model (its own precedence slip).
    init_config = {key: config[key] for key in ("zero_optimization", "bf16", "fp16") if key in config}
    with deepspeed.zero.Init(config_dict_or_path={**init_config, "train_micro_batch_size_per_gpu": 1},
                             data_parallel_group=group):
        model = AutoModelForCausalLM.from_config(meta.config, dtype=dtype)
    built = {p.ds_tensor.dtype for p in model.parameters()}
    if built != {dtype}:
        raise ModelError(f"deepspeed.config: its bf16/fp16 sections made ZeRO-3 build "
                         f"{', '.join(sorted(map(str, built)))} partitions of a {dtype} model; make them match "
                         "model.dtype")
    return model


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT builds go: one folder per Python environment and torch version, so that
    virtualenvs or containers sharing a HOME neither rebuild over each other's build nor race on it."""
    key = hashlib.sha256(f"{sys.prefix}\n{sys.version}\n{torch.__version__}".encode()).hexdigest()[:12]
    return cache_dir() / "torch_extensions" / key


def deepspeed_config(settings: EngineSettings, micro_batch: int, dtype: torch.dtype, ranks: int) -> dict:
    """mpifed's defaults with the facility's `deepspeed.config` JSON merged over them."""
    ds = settings.deepspeed
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": settings.grad_accum,
        "train_batch_size": micro_batch * settings.grad_accum * ranks,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 31,
        "wall_clock_breakdown": False,
    }
    if not ds.config:
        return config
    try:
        user = json.loads(Path(ds.config).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"deepspeed.config {ds.config}: cannot read it as JSON ({exc})") from None
    clash = [key for key in _OWN_KEYS if key in user and user[key] != config[key]]
    if clash:
        raise ValueError(f"deepspeed.config {ds.config}: {', '.join(clash)} come from train.micro_batch and "
                         "train.grad_accum; remove them from the JSON and set those instead")
    merged = _merge(config, user)
    stage = merged.get("zero_optimization", {}).get("stage")
    if stage not in (1, 2, 3):
        raise ValueError(f"deepspeed.config {ds.config}: zero_optimization.stage {stage!r} is not 1, 2 or 3")
    return merged


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 1/2/3 over the facility's group (DeepSpeed itself runs on torch's default group,
    which mpifed makes the facility's, and reads LOCAL_RANK): ZeRO 1/2 ranks hold the whole model and
    own an even share; ZeRO-3 ranks hold and own their partition of every parameter."""

    def __init__(self, model: torch.nn.Module, settings: EngineSettings, micro_batch: int) -> None:
        # The CPU accelerator JIT-builds a communication op on first use: build it once per machine.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
        import deepspeed

        self.layout = FlatLayout.of(model)
        self.settings = settings
        self._size, rank = settings.ranks, settings.rank
        dtype = next(p for p in model.parameters() if p.requires_grad).dtype
        config = deepspeed_config(settings, micro_batch, dtype, self._size)
        self.zero_stage = config["zero_optimization"]["stage"]
        partitioned = on_meta(model) and self.zero_stage == 3
        if on_meta(model):  # built empty: make it real, partitioned as it is built under ZeRO-3
            model = _real_model(model, config, settings.group, dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = None if "optimizer" in config else settings.adamw(params)
        if not partitioned:  # zero.Init put each partition on this rank's device already
            model.to(settings.device)
        self._engine, self._optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params if optimizer is None else None, optimizer=optimizer,
            config=config, dist_init_required=False)
        self._forward = self._engine
        self._params = params
        pieces = []
        for slot, param in zip(self.layout.slots, params):
            if self.zero_stage < 3:
                pieces.append((slot.offset, param.data.view(-1)))
                continue
            part = param.ds_tensor.numel()
            start = rank * part
            valid = max(0, min(part, slot.numel - start))
            if valid:
                pieces.append((slot.offset + start, param.ds_tensor.data.view(-1)[:valid]))
        self._held = Pieces(pieces)
        self._owned = self._held.share(rank, self._size, self.layout.numel) if self.zero_stage < 3 else self._held.views

    def model(self) -> torch.nn.Module:
        return self._engine.module

    def before_exchange(self) -> None:
        if self.zero_stage == 3:  # small parameters stay gathered between steps: release those copies
            self._optimizer.checkpoint_event_prologue()
        super().before_exchange()

    def after_exchange(self) -> None:
        super().after_exchange()
        self._optimizer.refresh_fp32_params()  # DeepSpeed's fp32 master copy follows the new model
        if self.zero_stage == 3:  # and gather the persistent ones again, now with the new values
            self._optimizer.checkpoint_event_epilogue()

    def set_lr(self, lr: float) -> None:
        for group in self._optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, batches: list[TensorBatch], lr: float) -> float:
        self._engine.train()
        self.set_lr(lr)
        loss_sum = torch.zeros((), device=self.settings.device)
        for batch in batches:  # DeepSpeed scales by 1/grad_accum and steps at the boundary
            loss = self._engine(**lm_inputs(batch, self.settings.device)).loss
            self._engine.backward(loss)
            self._engine.step()
            loss_sum += loss.detach().float() / len(batches)
        dist.all_reduce(loss_sum, group=self.settings.group)
        return float(loss_sum) / self._size

    def _base_state(self) -> dict:
        return self._optimizer.optimizer.state

    def reset_optimizer(self) -> None:
        # In place: with ZeRO 1/2, DeepSpeed links every parameter to views of these tensors.
        for state in self._base_state().values():
            state["step"] = torch.zeros_like(torch.as_tensor(state["step"], dtype=torch.float32))
            for key in OPTIMIZER_KEYS:
                state[key].zero_()

    def _param_states(self, key: str) -> list[np.ndarray]:
        """`key` of the optimizer state for every held piece (ZeRO 1/2: collective over the facility)."""
        from deepspeed.utils import safe_get_full_optimizer_state, safe_get_local_optimizer_state

        out = []
        for (offset, values), param in zip(self.held(), self._held_params()):
            if self.zero_stage < 3:
                state = safe_get_full_optimizer_state(param, key)
            else:
                state = safe_get_local_optimizer_state(param, key)
            out.append(state.detach().reshape(-1)[:len(values)].float().cpu().numpy())
        return out

    def _held_params(self) -> list[torch.nn.Parameter]:
        if self.zero_stage < 3:
            return self._params
        rank = self.settings.rank
        return [p for p in self._params if p.ds_tensor.numel() * rank < p.ds_numel]

    def optimizer_state(self) -> dict[str, np.ndarray]:
        states = [s for s in self._base_state().values() if s]
        if not states:
            return {}
        out = {"step": np.array([float(states[0]["step"])], np.float32)}
        for key in OPTIMIZER_KEYS:
            out[key] = self._select_owned(self._param_states(key))
        return out

    def load_optimizer_state(self, flat: dict[str, np.ndarray]) -> None:
        if not flat:
            return
        from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

        if not isinstance(self._optimizer.optimizer, torch.optim.AdamW):
            raise ValueError("resuming the inner optimizer state needs torch's AdamW (the deepspeed.config "
                             "names another optimizer)")
        step = torch.tensor(float(flat["step"][0]), dtype=torch.float32)
        # AdamW creates its state lazily, keyed by DeepSpeed's fp32 master partitions: make it now
        # (and, with ZeRO 1/2, have DeepSpeed link its per-parameter views to it).
        masters = self._optimizer.fp32_partitioned_groups_flat if self.zero_stage == 3 \
            else self._optimizer.single_partition_of_fp32_groups
        for master in masters:
            if not self._base_state().get(master):
                self._base_state()[master] = {k: torch.zeros_like(master) for k in OPTIMIZER_KEYS}
                if self.zero_stage < 3:
                    self._optimizer._hp_optimizer_states_linked = False
            self._base_state()[master]["step"] = step.clone()
        if self.zero_stage < 3:
            self._optimizer._lazy_init_hp_params_optimizer_state()
        for (offset, values), param in zip(self.held(), self._held_params()):
            for key in OPTIMIZER_KEYS:
                value = torch.from_numpy(flat[key][offset:offset + len(values)].copy()).to(self.settings.device)
                if self.zero_stage < 3:
                    safe_set_full_optimizer_state(param, value.view(param.shape), key)
                else:
                    padded = torch.zeros(param.ds_tensor.numel(), dtype=value.dtype, device=value.device)
                    padded[:len(values)] = value
                    safe_set_local_optimizer_state(param, padded, key)
