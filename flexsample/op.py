"""`flexsample::sample_attention`: the one run-time door under both integrations.

The compiler pass puts it where an SDPA call was; the transformers attention function calls
it for plain causal prefill. An opaque custom op, so every decision (`paths.dense_reason`:
length, dtype, device, whether a given mask is the causal one or a padding mask keeps every
key) is taken at run time on the real tensors: one compiled graph serves every input of a
length, short prompts, padded batches and decode steps included, and dynamic shapes need no
guards on our conditions. It has no autograd formula: both doors send inputs that require
grad elsewhere.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json

import torch
import torch.nn.functional as F

from flexsample import graphs
from flexsample.attention import sparse_attention, validate_inputs
from flexsample.causal_mask import causal_padding_mask
from flexsample.config import SampleConfig
from flexsample.key_mask import checked_key_mask
from flexsample.paths import dense_reason, record

#: Paths each call site of the op took at run time: site -> Counter("sparse" / "dense:<why>").
site_paths: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(
    collections.Counter
)


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
    site: str = "",
) -> torch.Tensor:
    """Causal SDPA, sparse where SampleAttention applies. Shapes `[B, H, S, D]`.

    Without `attn_mask` it is `scaled_dot_product_attention(q, k, v, is_causal=True, ...)`:
    unequal lengths keep SDPA's TOP-LEFT alignment, since the op replaces such SDPA calls.
    With an SDPA mask (3 or 4 dims) it is `scaled_dot_product_attention(q, k, v,
    attn_mask=attn_mask, ...)`, sparse only when the mask is exactly causal over equal
    lengths. A 2-D `attn_mask` `[B, Skv]` is one of the transformers door's key masks, causal
    aligned to the END of the keys: a bool padding mask (True = keep), sparse when it keeps
    every key, or integer packed-sequence ids (a query sees its own sequence's keys; what a
    traced prefill with position ids gets), sparse when each batch row is one sequence; the
    `[B, 1, Sq, Skv]` mask is built only for the dense path. `site` names the call
    site for `site_paths` (the compiler pass's report).
    """
    validate_inputs(q, k, v, enable_gqa=enable_gqa, scale=scale, longer_query=True)
    key_mask = attn_mask is not None and attn_mask.dim() == 2
    reading = checked_key_mask(attn_mask, q.shape[0], k.shape[2]) if key_mask else None
    reason = dense_reason(q, k, _config_from_str(config), attn_mask, reading)
    site_paths[site][record(reason, tuple(q.shape))] += 1
    if reason is not None:
        if key_mask:
            attn_mask = causal_padding_mask(q.shape[2], k.shape[2], attn_mask)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=attn_mask is None,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    else:
        # transformers hands over transposed views ([B, S, H, D] memory); the score kernel
        # and flex run ~1.5x slower on them at 128K (bench/op_path.py) than the copy costs.
        # A custom op runs with ADInplaceOrView in or out of the dispatch set depending on
        # its caller (eager, or a compiled graph's first or later call); the compiled flex
        # inside guards on that set and recompiled on each flip (torch 2.11, TORCH_LOGS=
        # recompiles in bench/ttft.py), so fix it here, and the grad mode it guards on too:
        # the op has no autograd anyway.
        sample_config = _config_from_str(config)
        with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView():
            if graphs.replay_applies(q, sample_config):
                out = _empty_like_query(q, v.shape[-1])
                return graphs.sparse_attention_into(out, q, k, v, sample_config, scale)
            out = sparse_attention(*(t.contiguous() for t in (q, k, v)), sample_config, scale=scale)
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
def _(q, k, v, attn_mask, scale, enable_gqa, config, site=""):
    return _empty_like_query(q, v.shape[-1])
