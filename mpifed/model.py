"""Models: LLaMA and Mixtral (mixture-of-experts) causal LMs from `transformers`, built from a named
preset or from a local model folder (never the hub), with the attention implementation and dtype the
run asks for.

Every rank builds the same architecture; initial weights come from the global root at start, so ranks
never need to agree on a random generator.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MixtralConfig, PreTrainedModel

from mpifed.config import ModelConfig
from mpifed.data import VOCAB_SIZE

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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ModelError(ValueError):
    """A model that cannot be built: a missing folder, an unknown preset, a missing attention kernel."""


def _check_attention(name: str) -> None:
    if name == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ModelError("model.attention = flash_attention_2 needs the flash-attn package; "
                             "install it or choose sdpa")


def build_model(cfg: ModelConfig | str, max_positions: int, seed: int, vocab_size: int = VOCAB_SIZE
                ) -> PreTrainedModel:
    """A model per `cfg` (or a preset name): the preset freshly initialised (deterministic in `seed`),
    or the folder `cfg.path` with its weights (or re-initialised with `cfg.reinit`). Weights are on the CPU."""
    cfg = ModelConfig(preset=cfg) if isinstance(cfg, str) else cfg
    _check_attention(cfg.attention)
    dtype = DTYPES[cfg.dtype]
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


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a LLaMA/Mixtral-style model (what FSDP wraps one by one)."""
    return list(model.model.layers)
