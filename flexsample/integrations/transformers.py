"""transformers integration: `attn_implementation="flexsample"` after `register()`.

The sparse path runs only for attention it fully understands: a causal prefill (query as long
as the keys, S > 1) with no dropout, no inputs that require grad, and nothing in the call's
keyword arguments or the module's attributes that changes the math beyond scaled dot-product
attention (`fallback_reason`, an allow-list). It goes through the run-time op that the
compiler pass also uses, which checks a given mask (padded batches run SDPA with it). The
door's mask function (`flexsample_mask`) hands a plain causal prefill nothing S×S: None, or
the `[B, S]` padding mask, as transformers' flash-attention door does; other masks are SDPA's.
Everything else runs the model's own correct attention: transformers' SDPA function, or the
model's eager function where its family refuses SDPA (sinks, for example), with the mask
converted to what that function expects (`fallback_mask`). So soft-capping, attention
sinks, sliding windows shorter than the keys, position biases, training and unknown future
arguments keep eager's answer. Causal alignment: a shorter query (cached chunk, decode step)
is aligned to the END of the keys, by transformers' own masks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)
from transformers.utils.import_utils import is_tracing

from flexsample.causal_mask import causal_padding_mask
from flexsample.config import SampleConfig, as_config
from flexsample.key_mask import checked_key_mask, read_key_mask, read_once
from flexsample.op import config_to_str
from flexsample.paths import dense_reason

NAME = "flexsample"

#: Keyword arguments that do not change attention's math for unpacked inputs (position ids
#: were used by RoPE before this call; the rest is bookkeeping of the caller).
_IGNORED_KWARGS = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "past_key_values",
        "past_key_value",
        "layer_idx",
        "return_dict",
        "output_hidden_states",
        "token_type_ids",
    }
)
#: Features that change the math when given: attention runs the model's own path then.
_FEATURE_KWARGS = frozenset(
    {
        "softcap",
        "s_aux",
        "sinks",
        "position_bias",
        "alibi_slopes",
        "head_mask",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "target_dtype",
    }
)
#: Of those, what transformers' SDPA function drops or refuses (soft-capping: 5.17 ignores
#: it, 5.24 raises), so only the model's eager function computes it.
_EAGER_ONLY_KWARGS = frozenset({"softcap", "s_aux", "sinks", "alibi_slopes", "head_mask"})


def fallback_reason(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    is_causal: bool | None,
    kwargs: dict,
) -> str | None:
    """Why this call is not for SampleAttention (None: it is). query `[B, Hq, Sq, D]`,
    key/value `[B, Hkv, Skv, D]`; `kwargs` are the extra keyword arguments of the call."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "inputs require grad (the op has no backward; training runs the model's path)"
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return "not causal"
    if dropout:
        return f"dropout={dropout}"
    if query.shape[2] <= 1 or query.shape[2] != key.shape[2]:
        return "not a prefill (query shorter than the keys)"
    if getattr(module, "sinks", None) is not None:
        return "attention sinks"
    for name, value_ in kwargs.items():
        if name in _IGNORED_KWARGS or value_ is None:
            continue
        if name == "output_attentions":
            if value_:
                return "output_attentions=True"
        elif name == "sliding_window":
            if value_ < key.shape[2]:
                return f"sliding window {value_} < {key.shape[2]} keys"
        elif name in _FEATURE_KWARGS:
            return f"{name} given"
        else:
            return f"unknown argument {name!r}"
    return None


def door_reason(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    is_causal: bool | None,
    kwargs: dict,
    config: SampleConfig,
) -> str | None:
    """Why this door runs a call dense (its allow-list, then `paths.dense_reason` on the
    tensors and mask, as the op decides it), or None when it runs sparse."""
    reason = fallback_reason(module, query, key, value, dropout, is_causal, kwargs)
    return reason if reason is not None else dense_reason(query, key, config, attention_mask)


def make_attention_forward(config: SampleConfig | None = None):
    """A transformers attention function (the `sdpa_attention_forward` signature) using config."""
    config_str = config_to_str(as_config(config))

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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if fallback_reason(module, query, key, value, dropout, is_causal, kwargs) is not None:
            return model_attention(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
        # Through the op, so that the sparse-or-dense decision is taken at run time under
        # torch.compile too, on the real mask.
        out = torch.ops.flexsample.sample_attention(
            query, key, value, attention_mask, scaling, True, config_str, "transformers"
        )
        return out.transpose(1, 2).contiguous(), None

    return flexsample_attention_forward


def model_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What computes this module's attention correctly without flexsample: the module's own
    eager function where the model family refuses SDPA or the call carries a feature that
    transformers' SDPA function drops (soft-cap, sinks), else that SDPA function.
    `attention_mask` is what `flexsample_mask` gave (None, bool `[B, Skv]` padding or SDPA's
    4-D mask); each function gets it in its own format (`fallback_mask`)."""
    eager = _eager_function(type(module))
    eager_only = getattr(module, "sinks", None) is not None or any(
        kwargs.get(name) is not None for name in _EAGER_ONLY_KWARGS
    )
    if eager is None or not (eager_only or _refuses_sdpa(type(module))):
        mask = fallback_mask(attention_mask, query, key, additive=False)
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    mask = fallback_mask(attention_mask, query, key, additive=True)
    kwargs.pop("is_causal", None)
    return eager(module, query, key, value, mask, **kwargs)


def _eager_function(module_type: type):
    """The eager attention function of the module's modeling file, or None."""
    return getattr(sys.modules.get(module_type.__module__), "eager_attention_forward", None)


@torch.compiler.assume_constant_result  # torch 2.11's dynamo cannot trace the scan below
def _refuses_sdpa(module_type: type) -> bool:
    """Whether a model of the module's modeling file declares no SDPA support (cached)."""
    if module_type not in _sdpa_refusals:
        _sdpa_refusals[module_type] = _scan_sdpa_refusal(module_type)
    return _sdpa_refusals[module_type]


_sdpa_refusals: dict[type, bool] = {}


def _scan_sdpa_refusal(module_type: type) -> bool:
    modeling = sys.modules.get(module_type.__module__)
    models = (
        [
            obj
            for obj in vars(modeling).values()
            if isinstance(obj, type)
            and issubclass(obj, PreTrainedModel)
            and obj is not PreTrainedModel
        ]
        if modeling is not None
        else []
    )
    return not all(getattr(model, "_supports_sdpa", False) for model in models)


def fallback_mask(
    mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, *, additive: bool
) -> torch.Tensor | None:
    """The door's mask (None: causal; bool `[B, Skv]`: padding; or SDPA's `[B, 1, Sq, Skv]`) in
    the format a fallback expects, causal aligned to the END of the keys: transformers' SDPA
    function takes None or the 4-D bool mask, an eager function (`additive`) a float
    `[B or 1, 1, Sq, Skv]` mask in the query's dtype (0 kept, dtype min dropped)."""
    if mask is None and not additive:
        return None  # the SDPA function runs is_causal=True itself
    if mask is not None and mask.dim() == 2:
        checked_key_mask(mask, query.shape[0], key.shape[2])
    if mask is None or mask.dim() == 2:
        mask = causal_padding_mask(query.shape[2], key.shape[2], mask, device=query.device)
    if not additive or mask.dtype != torch.bool:
        return mask
    lowest = torch.finfo(query.dtype).min
    return torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(~mask, lowest)


def flexsample_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> torch.Tensor | None:
    """The door's mask function (`AttentionMaskInterface`, called by transformers'
    `create_*_mask`; `attention_mask` is the bool `[B, Skv]` padding mask or None).

    A plain causal prefill gets nothing S×S, as transformers' flash-attention door: None
    without padding, else the `[B, S]` padding mask, also when traced (where its values cannot
    be read), for the op to check in O(B·S). A traced prefill with position ids and neither
    padding nor cache gets transformers' causal ∧ packed-sequence function (its packing check
    cannot run under tracing): that one becomes `[B, S]` integer sequence ids
    (`packed_sequence_ids`), which the op checks in O(B·S) too. Either `[B, S]` mask reaches the
    layers as one `read_once` copy, read by the first call that needs its values: one host
    sync per forward, not one per layer. Every other mask (sliding window, chunked,
    bidirectional, packed sequences in eager code, materialised on request, cached chunks and
    decode steps) is `sdpa_mask`'s: None or bool `[B, 1, Sq, Skv]`.
    """
    plain_prefill = (
        mask_function is causal_mask_function
        and local_size is None
        and allow_is_causal_skip  # False: the caller needs the mask built (e.g. to combine it)
        and not isinstance(q_offset, torch.Tensor)  # static caches' offset: not a prefill
        and q_offset == 0
        and kv_offset == 0
        and q_length == kv_length
        and (attention_mask is None or attention_mask.shape[-1] == kv_length)
    )
    if is_tracing() and _may_be_packed_causal(
        mask_function, attention_mask, local_size, q_offset, kv_offset, q_length, kv_length, kwargs
    ):
        return read_once(
            packed_sequence_ids(mask_function, batch_size, q_length, kwargs.get("device"))
        )
    if not plain_prefill:
        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            local_size=local_size,
            allow_is_causal_skip=allow_is_causal_skip,
            **kwargs,
        )
    if attention_mask is None:
        return None
    mask = read_once(attention_mask)  # one read for every layer, not one per layer
    # Eager code can read the mask (through the copy, whose reading the layers then reuse): no
    # padding gives None, so fallbacks keep SDPA's is_causal.
    if not is_tracing(attention_mask) and read_key_mask(mask).keeps_every_key:
        return None
    return mask


def register(config: SampleConfig | None = None, name: str = NAME) -> str:
    """Register the attention function and its mask function (`flexsample_mask`) under
    `name`; returns it.

    Then `AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)` (or
    `from_config`) uses it. Calling again with another config replaces the registration.
    """
    AttentionInterface.register(name, make_attention_forward(config))
    AttentionMaskInterface.register(name, flexsample_mask)
    return name


def _may_be_packed_causal(
    mask_function: Callable,
    attention_mask: torch.Tensor | None,
    local_size: int | None,
    q_offset: int | torch.Tensor,
    kv_offset: int,
    q_length: int,
    kv_length: int,
    kwargs: dict,
) -> bool:
    """Whether a traced mask request has the shape of transformers' causal ∧ packed-sequence
    mask of a prefill: a mask function other than the module-level causal or bidirectional
    one, with no padding, cache, window, or user and/or mask function (those set `use_vmap`).
    Its parts cannot be read under tracing (dynamo reads no closures), so
    `packed_sequence_ids` checks the one other form transformers builds here (bidirectional
    blocks) by its values. Only identity tests here: torch 2.11's dynamo can neither compare
    a nested function's name nor always answer isinstance() on a function."""
    return (
        mask_function is not causal_mask_function
        and mask_function is not bidirectional_mask_function
        and not kwargs.get("use_vmap", False)
        and attention_mask is None
        and local_size is None
        and not isinstance(q_offset, torch.Tensor)
        and q_offset == 0
        and kv_offset == 0
        and q_length == kv_length
    )


def packed_sequence_ids(
    mask_function: Callable, batch_size: int, length: int, device: torch.device | str | None
) -> torch.Tensor:
    """Integer `[B, S]` sequence ids of a causal ∧ packed-sequence mask function, read from it
    in O(B·S): token i starts a new sequence where it may not see token i - 1. A function that
    lets any token see the next one is not of that form (e.g. a bidirectional image block):
    its batch rows get -1, which the op refuses with an error rather than guess the mask."""
    batch = torch.arange(batch_size, device=device)[:, None]
    head = torch.zeros((), dtype=torch.long, device=device)
    index = torch.arange(1, length, device=device)[None, :]
    joined = mask_function(batch, head, index, index - 1).expand(batch_size, length - 1)
    ahead = mask_function(batch, head, index - 1, index).expand(batch_size, length - 1)
    starts = torch.cat([torch.zeros_like(joined[:, :1]), ~joined], dim=1)
    ids = starts.cumsum(-1)
    return torch.where(ahead.any(-1, keepdim=True), -1, ids)


def compile_model(
    model: PreTrainedModel, config: SampleConfig | None = None, **compile_kwargs
) -> PreTrainedModel:
    """The one line for a compiled prefill: `model` switched to the door (`register(config)`)
    and each decoder layer compiled with a dynamic length (regional compilation: identical
    layers share one graph; `compile_kwargs` go to `torch.compile`, e.g. `backend`). Returns
    `model`, changed in place.

    Measured on a random-init Llama-3-8B shape (bench/ttft.py, "door ~10% layers"): first
    compile 4.3 s against 55.7 s for `torch.compile(model)` through the door (H200), 19.8 s
    against 105 s for the dense compiled model (H100, `ttft_layers.md`), prefill as fast or
    faster, no recompile at 64K and 128K after 32K, peak memory at 128K below eager SDPA's.
    The decoder layers are transformers' `GradientCheckpointingLayer` modules; a model
    without any raises `ValueError`.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no transformers decoder layers "
            "(GradientCheckpointingLayer) to compile: use torch.compile(model) after "
            "register() and set_attn_implementation() instead"
        )
    model.set_attn_implementation(register(config))
    for layer in layers:
        layer.compile(dynamic=True, **compile_kwargs)
    return model
