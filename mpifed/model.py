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

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MixtralConfig, PreTrainedModel

from mpifed.config import LoraConfig, ModelConfig, Precision, Preset, RunConfig, check_table
from mpifed.layout import FlatLayout

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
    """A model that cannot be built: a missing folder, an unknown preset, a missing attention kernel."""


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


def model_for(cfg: RunConfig, seq_len: int, vocab_size: int, weights: bool = True) -> torch.nn.Module:
    """The model a run of `cfg` trains on data of `seq_len`-token sequences over `vocab_size` tokens: a
    preset sized to them, or the model folder (checked to cover the vocabulary); with lora.rank, the
    adapters on top. `weights=False` builds the same architecture without reading a model folder's
    weights (for its layout)."""
    model_cfg = cfg.model if weights or not cfg.model.path else dataclasses.replace(cfg.model, reinit=True)
    model = build_model(model_cfg, seq_len, cfg.train.seed, vocab_size=vocab_size)
    if model.config.vocab_size < vocab_size:
        raise ModelError(f"model.path {cfg.model.path}: its vocabulary of {model.config.vocab_size} tokens is smaller "
                         f"than the {vocab_size} of data.path {cfg.data.path}; prepare the data with the model's "
                         "tokenizer")
    return apply_lora(model, cfg.lora, cfg.train.seed) if cfg.lora.rank else model


def planned_layout(cfg: RunConfig, seq_len: int, vocab_size: int) -> FlatLayout:
    """The flat layout a run of `cfg` will exchange, from a model built on the meta device (no memory,
    no weights read): what separately launched facilities compare before they join."""
    with torch.device("meta"):
        return FlatLayout.of(model_for(cfg, seq_len, vocab_size, weights=False))
