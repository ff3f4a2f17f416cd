"""transformers integration: `attn_implementation="flexsample"` after `register()`.

Plain causal prefill (equal query and key lengths, no dropout, and no mask or an exactly
causal one, which transformers passes when it is traced) runs SampleAttention; a mask is
checked at run time by the op the compiler pass also uses, so padded batches run SDPA with
it. Everything else (decode steps, cached chunks, dropout, softcap) runs transformers' own
SDPA attention function unchanged, with all its shape handling.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from flexsample.compile.op import config_to_str
from flexsample.config import SampleConfig

NAME = "flexsample"


def is_plain_prefill(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    dropout: float,
    is_causal: bool | None,
    kwargs: dict,
) -> bool:
    """A causal prefill with nothing SampleAttention lacks: query `[B, H, S, D]` as long as
    key (S > 1), no dropout, softcap, position bias or returned attention weights."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(
        causal
        and dropout == 0.0
        and query.shape[2] > 1
        and query.shape[2] == key.shape[2]
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and not kwargs.get("output_attentions", False)
    )


def make_attention_forward(config: SampleConfig | None = None):
    """A transformers attention function (the `sdpa_attention_forward` signature) using config."""
    config = config or SampleConfig()
    config_str = config_to_str(config)

    def flexsample_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if not is_plain_prefill(module, query, key, dropout, is_causal, kwargs):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                is_causal=is_causal, **kwargs,
            )  # fmt: skip
        # Through the op, so that the sparse-or-dense decision is taken at run time under
        # torch.compile too, on the real mask.
        out = torch.ops.flexsample.sample_attention(
            query, key, value, attention_mask, scaling, True, config_str
        )
        return out.transpose(1, 2).contiguous(), None

    return flexsample_attention_forward


def register(config: SampleConfig | None = None, name: str = NAME) -> str:
    """Register the attention function (and SDPA's mask format) under `name`; returns it.

    Then `AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)` (or
    `from_config`) uses it. Calling again with another config replaces the registration.
    """
    AttentionInterface.register(name, make_attention_forward(config))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
