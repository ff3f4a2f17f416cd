"""Tiny randomly initialised transformers models for the integration tests.

`CONFIGS`: plain causal decoders (no sliding window) for the op and compiler tests.
`FAMILIES`: one tiny model per attention family with its special features switched on
(sliding windows shorter than the test sequences, soft-capping, sinks, mixed sliding and
global layers, bidirectional encoders), for the equivalence matrix of `test_families.py`.
"""

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    Cohere2Config,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    ModernBertConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
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

#: Sliding window (tokens) of the windowed families: shorter than the sequences tested.
WINDOW = 32
MIXED = ["sliding_attention", "full_attention"]  # one windowed and one global layer
#: Shared by the families: SMALL with 16-dim heads, in-vocabulary special tokens, and larger
#: initial weights than transformers' 0.02 (logits ~3), so that soft-caps and sinks bite.
FAMILY_SMALL = dict(
    SMALL, head_dim=16, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2
)
ENCODER_SMALL = {
    k: v for k, v in FAMILY_SMALL.items() if k not in ("num_key_value_heads", "head_dim")
}

# Qwen2/Qwen3: layers from `max_window_layers` on are windowed when use_sliding_window.
QWEN_WINDOW = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)

#: family -> (config class, its features switched on); built by `family_config`.
FAMILIES = {
    "llama": (LlamaConfig, {}),
    "qwen2": (Qwen2Config, dict(QWEN_WINDOW)),
    "qwen3": (Qwen3Config, dict(QWEN_WINDOW)),
    "mistral": (MistralConfig, dict(sliding_window=WINDOW)),
    "phi3": (Phi3Config, dict(sliding_window=WINDOW)),
    # Small caps, so that they bite on random weights.
    "gemma2": (
        Gemma2Config,
        dict(
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            layer_types=MIXED,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        Gemma3TextConfig,
        dict(query_pre_attn_scalar=16, sliding_window=WINDOW, layer_types=MIXED),
    ),
    "cohere2": (Cohere2Config, dict(sliding_window=WINDOW, layer_types=MIXED)),
    # Sinks: drawn from N(0, 1) by `tiny_family`. YaRN factor consistent with the lengths.
    "gpt_oss": (
        GptOssConfig,
        dict(
            sliding_window=WINDOW,
            layer_types=MIXED,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=4.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=4096,
            ),
        ),
    ),
    "bert": (BertConfig, {}),
    # ModernBERT: bidirectional; its local layers see +-local_attention/2 tokens.
    "modernbert": (
        ModernBertConfig,
        dict(
            local_attention=WINDOW,
            layer_types=["full_attention", "sliding_attention"],
            cls_token_id=1,
            sep_token_id=2,
        ),
    ),
}
ENCODERS = {"bert", "modernbert"}


def family_config(family: str, **overrides):
    """The tiny config of `family` with its features on; `overrides` replace any field."""
    config_class, features = FAMILIES[family]
    base = ENCODER_SMALL if family in ENCODERS else FAMILY_SMALL
    return config_class(**{**base, **features, **overrides})


def tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[arch](pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def tiny_family(family: str, attn_implementation: str | None = "eager", seed: int = 0, **overrides):
    """The tiny model of `family` (features on, `overrides` applied to its config), randomly
    initialised from `seed`, in eval mode. `attn_implementation=None`: transformers' choice.

    The same seed gives the same weights under every attention implementation. GPT-OSS sinks
    are drawn from N(0, 1) (its own init gives ~N(0, 0.02^2), too small to notice).
    """
    torch.manual_seed(seed)
    config = family_config(family, **overrides)
    auto = AutoModelForMaskedLM if family in ENCODERS else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=attn_implementation)
    if family == "gpt_oss":
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model.model.layers:
                sinks = layer.self_attn.sinks
                sinks.copy_(torch.randn(sinks.shape, generator=generator))
    return model.eval()
