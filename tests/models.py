"""Tiny randomly initialised transformers models for the integration tests."""

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16384,
)
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**SMALL, **kw),
    "qwen2": lambda **kw: Qwen2Config(**SMALL, **kw),
    "mistral": lambda **kw: MistralConfig(**SMALL, sliding_window=None, **kw),
}


def tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[arch](pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()
