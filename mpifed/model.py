"""Models: LLaMA-architecture causal LMs from `transformers`, built from named presets (no hub access).

Every rank builds the same architecture; initial weights come from the global root at start, so ranks
never need to agree on a random generator.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mpifed.data import VOCAB_SIZE

PRESETS: dict[str, dict[str, int]] = {
    # ~0.12M parameters: fast enough for multi-rank tests on two cores.
    "llama-tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
    # ~3.3M parameters: the demo.
    "llama-small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4),
}


def build_model(preset: str, max_positions: int, seed: int) -> LlamaForCausalLM:
    """A freshly initialised fp32 model of `preset`, deterministic in `seed`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=max_positions,
                         tie_word_embeddings=False, attn_implementation="sdpa", **PRESETS[preset])
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
