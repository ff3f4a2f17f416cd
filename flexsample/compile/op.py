"""`flexsample::sample_attention`: the op the compiler pass puts where SDPA was.

An opaque custom op, so every decision (sparse or dense, by length, dtype, device, and
whether a given mask is the causal one) is taken at run time on the real tensors: one
compiled graph serves every input of a length, short prompts, padded batches and decode
steps included, and dynamic shapes need no guards on our conditions.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch
import torch.nn.functional as F

from flexsample.attention import path_counts, sample_attention
from flexsample.compile.causal_mask import is_causal_mask
from flexsample.config import SampleConfig


def config_to_str(config: SampleConfig) -> str:
    """A config as the op's string argument (JSON of its fields)."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


@functools.lru_cache(maxsize=64)
def _config_from_str(text: str) -> SampleConfig:
    return SampleConfig(**json.loads(text))


@torch.library.custom_op("flexsample::sample_attention", mutates_args=())
def sample_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    enable_gqa: bool,
    config: str,
) -> torch.Tensor:
    """Causal SDPA, sparse where SampleAttention applies.

    Without `attn_mask` it is `scaled_dot_product_attention(q, k, v, is_causal=True, ...)`
    (unequal lengths keep SDPA's top-left alignment); with one it is
    `scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, ...)`, sparse only when the
    mask is exactly causal over equal lengths. Shapes `[B, H, S, D]`.
    """
    equal_lengths = q.shape[-2] == k.shape[-2]
    if attn_mask is not None and not (equal_lengths and is_causal_mask(attn_mask)):
        path_counts["dense:mask"] += 1
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa
        )
    elif not equal_lengths:
        path_counts["dense:q_len!=kv_len"] += 1
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
    else:
        # transformers hands over transposed views ([B, S, H, D] memory); the score kernel
        # and flex run ~1.5x slower on them at 128K (bench/op_path.py) than the copy costs.
        out = sample_attention(
            *(t.contiguous() for t in (q, k, v)), _config_from_str(config), scale=scale,
            enable_gqa=enable_gqa,
        )  # fmt: skip
    # Most calls already return q's layout: compare strides on a meta tensor, so that the
    # real output-sized buffer exists only when a copy is needed.
    if out.stride() == _empty_like_query(q, v.shape[-1], "meta").stride():
        return out
    return _empty_like_query(q, v.shape[-1]).copy_(out)


def _empty_like_query(
    q: torch.Tensor, value_dim: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """`[B, H, S, Dv]` laid out in memory like q (SDPA and flex return q's layout; transformers
    passes `[B, S, H, D]`-major q): the fake and real outputs must agree on strides."""
    order = sorted(range(q.dim()), key=lambda d: q.stride(d), reverse=True)
    shape = [*q.shape[:-1], value_dim]
    return q.new_empty([shape[d] for d in order], device=device).permute(
        *[order.index(d) for d in range(q.dim())]
    )


@sample_attention_op.register_fake
def _(q, k, v, attn_mask, scale, enable_gqa, config):
    return _empty_like_query(q, v.shape[-1])
