"""Models: LLaMA and Mixtral (mixture-of-experts) causal LMs from `transformers`, built from a named
preset or from a local model folder (never the hub), with the attention implementation and dtype the
run asks for, optionally LoRA adapters (`peft`) on top of a frozen base; and the flat layout a
configuration will exchange (`planned_layout`, built on the meta device: nothing allocated).

Every rank builds the same architecture; initial weights come from the global root at start, so ranks
never need to agree on a random generator.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MixtralConfig, PreTrainedModel

from mpifed.config import LoraConfig, ModelConfig, Precision, Preset, RunConfig, check_table
from mpifed.layout import FlatLayout, ParamSlot

_TINY_MOE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
PRESETS: dict[str, tuple[type, dict]] = {
    # ~0.12M parameters: fast enough for multi-rank tests on two cores.
    "llama-tiny": (LlamaConfig, dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)),
    # ~3.3M parameters: the demo.
    "llama-small": (LlamaConfig, dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4)),
    # 4 experts, 2 per token, ~0.2M parameters.
    "mixtral-tiny": (MixtralConfig, _TINY_MOE),
    # The published 8B-class shapes, for real runs (with the vocabulary of the data they train on).
    "llama3-8b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)),
    "mixtral-8x7b": (MixtralConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                          num_experts_per_tok=2, rope_theta=1e6)),
}
check_table(PRESETS, Preset, "mpifed.model.PRESETS")
TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""model.dtype (and fsdp.mixed_precision) -> the torch dtype."""
check_table(TORCH_DTYPES, Precision, "mpifed.model.TORCH_DTYPES")


class ModelError(ValueError):
    """A model that cannot be built: a missing folder, an unknown preset, a missing attention kernel,
    weights that do not match their config. Bad input: the job exits 2."""

    exit_code = 2


def _check_attention(name: str) -> None:
    if name == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ModelError("model.attention = flash_attention_2 needs the flash-attn package; "
                             "install it or choose sdpa")


def build_model(cfg: ModelConfig | str, max_positions: int, seed: int, vocab_size: int) -> PreTrainedModel:
    """A model per `cfg` (or a preset name): the preset freshly initialised (deterministic in `seed`),
    or the folder `cfg.path` with its weights (or re-initialised with `cfg.reinit`). Weights are on the CPU."""
    cfg = ModelConfig(preset=cfg) if isinstance(cfg, str) else cfg
    _check_attention(cfg.attention)
    dtype = TORCH_DTYPES[cfg.dtype]
    torch.manual_seed(seed)
    if cfg.path:
        try:
            hf_config = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.path {cfg.path}: cannot read its config.json ({exc})") from None
        hf_config._attn_implementation = cfg.attention
        if cfg.reinit:
            return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        try:
            return AutoModelForCausalLM.from_pretrained(cfg.path, config=hf_config, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.path {cfg.path}: cannot load its weights ({exc})") from None
    if cfg.preset not in PRESETS:
        raise ModelError(f"unknown model preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    kind, shape = PRESETS[cfg.preset]
    hf_config = kind(vocab_size=vocab_size, max_position_embeddings=max_positions, tie_word_embeddings=False,
                     attn_implementation=cfg.attention, **shape)
    return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def apply_lora(model: PreTrainedModel, lora: LoraConfig, seed: int) -> torch.nn.Module:
    """`model` frozen, with LoRA adapters on `lora.modules` (the only trainable parameters). The adapters'
    initial values are deterministic in `seed`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.modules if m not in present]
    if missing:
        raise ModelError(f"lora.target_modules: {', '.join(missing)} not found in the model (its linear layers "
                         f"include {', '.join(sorted(n for n in present if n.endswith('proj')))})")
    torch.manual_seed(seed)
    return get_peft_model(model, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=lora.modules, bias="none"))


def base_digest(model: torch.nn.Module) -> str:
    """sha256 over the names and bytes of the frozen parameters (the base under LoRA adapters)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model itself (under LoRA: the frozen base the adapters sit in)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a LLaMA/Mixtral-style model (what FSDP wraps one by one)."""
    return list(base_model(model).model.layers)


def model_for(cfg: RunConfig, seq_len: int, vocab_size: int, weights: bool = True, empty: bool = False
              ) -> torch.nn.Module:
    """The model a run of `cfg` trains on data of `seq_len`-token sequences over `vocab_size` tokens: a
    preset sized to them, or the model folder (checked to cover the vocabulary); with lora.rank, the
    adapters on top. `weights=False` builds the same architecture without reading a model folder's
    weights (for its layout); `empty` builds it with its parameters on the meta device (see
    `parameters_on_meta`; `InitialModel` gives their values)."""
    whole = weights and not empty  # a model folder's weights are read here (else by InitialModel, by range)
    model_cfg = cfg.model if whole or not cfg.model.path else dataclasses.replace(cfg.model, reinit=True)
    if empty:
        with parameters_on_meta():
            model = build_model(model_cfg, seq_len, cfg.train.seed, vocab_size=vocab_size)
    else:
        model = build_model(model_cfg, seq_len, cfg.train.seed, vocab_size=vocab_size)
    if model.config.vocab_size < vocab_size:
        raise ModelError(f"model.path {cfg.model.path}: its vocabulary of {model.config.vocab_size} tokens is smaller "
                         f"than the {vocab_size} of data.path {cfg.data.path}; prepare the data with the model's "
                         "tokenizer")
    return apply_lora(model, cfg.lora, cfg.train.seed) if cfg.lora.rank else model


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside have their parameters on the meta device (no memory: an engine materialises
    only what it holds), their buffers real (rotary tables are computed when a layer is built). Each
    parameter exists on the CPU only while its module registers it."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


class InitialModel:
    """The global model a run starts from, as flat fp32 ranges on demand, without the whole of it in
    memory: a preset's (or a re-initialised folder's) fresh weights, each parameter drawn from its own
    generator (the seed and its index: the same values on any machine), normal(0, initializer_range)
    but norms 1 and biases 0 as transformers initialises them; or a model folder's own weights, read by
    range from its safetensors files. One parameter at a time is kept (ranges come in order)."""

    def __init__(self, model: torch.nn.Module, layout: FlatLayout, cfg: RunConfig) -> None:
        self.layout, self.seed = layout, cfg.train.seed
        self.folder = Path(cfg.model.path) if cfg.model.path and not cfg.model.reinit else None
        config = base_model(model).config
        self.std = getattr(config, "initializer_range", None) or 0.02
        owners = {f"{name}.{p}" if name else p: type(module).__name__
                  for name, module in model.named_modules() for p, _ in module.named_parameters(recurse=False)}
        self.kinds = {slot.name: "ones" if "Norm" in owners.get(slot.name, "") else
                      "zeros" if slot.name.endswith(".bias") else "normal" for slot in layout.slots}
        self.files = _safetensors_index(self.folder, layout) if self.folder else {}
        self._cached: tuple[str, np.ndarray] | None = None

    def _whole(self, index: int) -> np.ndarray:
        slot = self.layout.slots[index]
        if self._cached is None or self._cached[0] != slot.name:
            kind = self.kinds[slot.name]
            if kind == "normal":
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
                values = torch.empty(slot.numel).normal_(0.0, self.std, generator=generator).numpy()
            else:
                values = np.full(slot.numel, 1.0 if kind == "ones" else 0.0, np.float32)
            self._cached = (slot.name, values)
        return self._cached[1]

    def __call__(self, lo: int, hi: int) -> np.ndarray:
        out = np.empty(hi - lo, np.float32)
        for index, slot in enumerate(self.layout.slots):
            a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
            if a >= b:
                continue
            if self.folder is None:
                out[a - lo:b - lo] = self._whole(index)[a - slot.offset:b - slot.offset]
            else:
                out[a - lo:b - lo] = _read_safetensor(self.files[slot.name], slot, a - slot.offset, b - slot.offset)
        return out


def _safetensors_index(folder: Path, layout: FlatLayout) -> dict[str, Path]:
    """Which safetensors file of `folder` holds each parameter; ModelError naming the file and tensor
    where the folder does not match the configuration's model."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    elif (folder / "model.safetensors").exists():
        names = {}
        with safe_open(folder / "model.safetensors", "np") as f:
            names = dict.fromkeys(f.keys(), folder / "model.safetensors")
    else:
        raise ModelError(f"model.path {folder}: no model.safetensors or model.safetensors.index.json")
    for slot in layout.slots:
        if slot.name not in names:
            raise ModelError(f"model.path {folder}: no tensor {slot.name} in its safetensors files (they do not "
                             "match its config.json)")
        with safe_open(names[slot.name], "np") as f:
            shape = tuple(f.get_slice(slot.name).get_shape())
        if shape != tuple(slot.shape):
            raise ModelError(f"model.path {names[slot.name]}: tensor {slot.name} has shape {shape}, its config.json "
                             f"makes it {tuple(slot.shape)}")
    return names


def _read_safetensor(path: Path, slot: ParamSlot, a: int, b: int) -> np.ndarray:
    """Values [a, b) (flat, C order) of parameter `slot` from a safetensors file, as fp32, reading only
    the rows they span."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        tensor = f.get_slice(slot.name)
        if len(slot.shape) <= 1:
            return tensor[a:b].float().numpy()
        row = slot.numel // slot.shape[0]
        first, last = a // row, -(-b // row)
        rows = tensor[first:last].float().reshape(-1).numpy()
        return rows[a - first * row:b - first * row]


def planned_model(cfg: RunConfig, seq_len: int, vocab_size: int) -> tuple[PreTrainedModel, FlatLayout]:
    """The model a run of `cfg` will train, built on the meta device (no memory, no weights read), and
    the flat layout it will exchange."""
    with torch.device("meta"):
        model = model_for(cfg, seq_len, vocab_size, weights=False)
    return base_model(model), FlatLayout.of(model)


def planned_layout(cfg: RunConfig, seq_len: int, vocab_size: int) -> FlatLayout:
    """The flat layout a run of `cfg` will exchange (what separately launched facilities compare before
    they join)."""
    return planned_model(cfg, seq_len, vocab_size)[1]
