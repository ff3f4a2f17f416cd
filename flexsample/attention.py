"""Public API: `sample_block_mask`, `sample_attention`, input checks and the dense fallbacks.

Where the sparse path cannot apply (DESIGN §3) attention runs dense SDPA; the choice is logged
at debug level on the "flexsample" logger and counted in `path_counts`.
"""

from __future__ import annotations

import collections
import logging
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flexsample.config import SampleConfig
from flexsample.flex_backend import kernel_options as flex_kernel_options
from flexsample.mask import build_block_mask, select_stripes, token_mask
from flexsample.scores import block_scores

logger = logging.getLogger("flexsample")

#: How often each path ran in eager calls: "sparse" or "dense:<reason>".
path_counts: collections.Counter[str] = collections.Counter()

_SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SPARSE_DEVICES = ("cpu", "cuda")
_MAX_HEAD_DIM = 256
_compiled_flex = None


def validate_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, *, enable_gqa: bool = True
) -> None:
    """Raise `TypeError`/`ValueError` naming what is wrong with q `[B, Hq, Sq, D]`,
    k `[B, Hkv, Skv, D]`, v `[B, Hkv, Skv, Dv]`."""
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, S, D], got shape {tuple(x.shape)}")
    dtypes = {name: x.dtype for name, x in named.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"q, k, v must share one dtype, got {dtypes}")
    devices = {name: str(x.device) for name, x in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"q, k, v must be on one device, got {devices}")
    (batch, heads, seq_q, dim), (kb, kv_heads, seq_kv, kdim) = q.shape, k.shape
    if kb != batch:
        raise ValueError(f"batch sizes differ: q has {batch}, k has {kb}")
    if kdim != dim:
        raise ValueError(f"head dims differ: q has {dim}, k has {kdim}")
    if v is not None and (v.shape[0], v.shape[1], v.shape[2]) != (kb, kv_heads, seq_kv):
        raise ValueError(f"v must match k in [B, H, S]: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not 1 <= dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim {dim} is not supported: allowed 1..{_MAX_HEAD_DIM}")
    if v is not None and not 1 <= v.shape[3] <= _MAX_HEAD_DIM:
        raise ValueError(
            f"value head dim {v.shape[3]} is not supported: allowed 1..{_MAX_HEAD_DIM}"
        )
    if seq_q == 0 or seq_kv == 0:
        raise ValueError(f"sequence lengths must be >= 1, got q {seq_q}, k {seq_kv}")
    if seq_q > seq_kv:
        raise ValueError(f"query length {seq_q} exceeds key length {seq_kv}: not a causal prefill")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads {heads} must be a multiple of key/value heads {kv_heads}")
    if heads != kv_heads and not enable_gqa:
        raise ValueError(
            f"query heads {heads} != key/value heads {kv_heads}: pass enable_gqa=True for GQA"
        )


def dense_reason(q: torch.Tensor, k: torch.Tensor, config: SampleConfig) -> str | None:
    """Why these (valid) inputs take the dense path, or None when the sparse path applies."""
    if q.shape[2] != k.shape[2]:
        return "q_len!=kv_len"
    if q.shape[2] < config.min_seq_len:
        return "short"
    if q.dtype not in _SPARSE_DTYPES:
        return f"dtype:{str(q.dtype).removeprefix('torch.')}"
    if q.device.type not in _SPARSE_DEVICES:
        return f"device:{q.device.type}"
    return None


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA with the causal rule aligned to the end of the keys (prefill or cached chunk)."""
    seq_q, seq_kv = q.shape[2], k.shape[2]
    if seq_q == seq_kv:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
    if seq_q == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=enable_gqa)
    mask = torch.ones(seq_q, seq_kv, dtype=torch.bool, device=q.device).tril(seq_kv - seq_q)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa
    )


def _resolve_scale(q: torch.Tensor, scale: float | None) -> float:
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def sample_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SampleConfig | None = None,
    *,
    scale: float | None = None,
) -> BlockMask:
    """SampleAttention's causal block mask for q `[B, Hq, S, D]` and k `[B, Hkv, S, D]`.

    The mask has one row of blocks per query head (`[B, Hq, nQ, nKV]`), for `flex_attention`
    with `enable_gqa=True` when Hq != Hkv. Built on q's device with no host sync.
    """
    config = config or SampleConfig()
    validate_inputs(q, k)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"a causal prefill mask needs equal lengths, got q {q.shape[2]} and k {k.shape[2]}"
        )
    if q.dtype not in _SPARSE_DTYPES:
        raise TypeError(f"dtype {q.dtype} has no sparse kernel: allowed {_SPARSE_DTYPES}")
    # Backward through flex_attention needs the transposed (q-block) indices.
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    with torch.no_grad():
        scores, covered = block_scores(q, k, config, _resolve_scale(q, scale))
        stripes = select_stripes(scores, covered, config)
        return build_block_mask(stripes, q.shape[2], config, compute_q_blocks=needs_grad)


def attention_with_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Attention `[B, Hq, S, Dv]` under a causal BlockMask (e.g. from `sample_block_mask`).

    CUDA: compiled flex_attention. Elsewhere: SDPA under the mask's exact token mask, since
    flex_attention's unfused CPU path materialises S×S scores as well, but vmaps the mask_mod
    (which fails inside a custom op's dispatch, i.e. the compiler path) and has no backward.
    """
    global _compiled_flex
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=token_mask(block_mask), scale=scale, enable_gqa=enable_gqa
        )
    kwargs = {"block_mask": block_mask, "scale": scale, "enable_gqa": enable_gqa,
              "kernel_options": kernel_options}  # fmt: skip
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, **kwargs)
    # The unfused eager flex_attention materialises S×S; the compiled kernel does not.
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, **kwargs)


def sample_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SampleConfig | None = None,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Causal SampleAttention: q `[B, Hq, S, D]`, k/v `[B, Hkv, S, D(v)]` -> `[B, Hq, S, Dv]`.

    Same contract as `scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
    enable_gqa=enable_gqa)`; inputs the sparse path cannot serve run that dense call instead.
    """
    config = config or SampleConfig()
    validate_inputs(q, k, v, enable_gqa=enable_gqa)
    reason = dense_reason(q, k, config)
    if not torch.compiler.is_compiling():
        path_counts["sparse" if reason is None else f"dense:{reason}"] += 1
    if reason is not None:
        logger.debug("flexsample: dense attention (%s) for q %s", reason, tuple(q.shape))
        return dense_causal_attention(q, k, v, scale=scale, enable_gqa=enable_gqa)
    block_mask = sample_block_mask(q, k, config, scale=scale)
    scale = _resolve_scale(q, scale)
    enable_gqa = q.shape[1] != k.shape[1]
    return attention_with_mask(
        q, k, v, block_mask, scale=scale, enable_gqa=enable_gqa,
        kernel_options=flex_kernel_options(q, config, k=k, v=v, block_mask=block_mask),
    )  # fmt: skip
