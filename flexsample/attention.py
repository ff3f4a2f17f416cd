"""Public API: `sample_block_mask`, `sample_attention`, input checks and the dense fallback.

Where the sparse path cannot apply (ALGORITHM §5, `paths.dense_reason`) attention runs dense
SDPA; the choice is logged at debug level on the "flexsample" logger and counted in
`path_counts`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flexsample import tail
from flexsample.antidiagonal import antidiagonal_scores, selected_lists
from flexsample.block_mask import (
    build_block_mask,
    keep_block_mask,
    kept_blocks,
    with_causal_mask_mod,
)
from flexsample.causal_mask import causal_padding_mask
from flexsample.config import SampleConfig, as_config
from flexsample.flex_backend import kernel_options, run_compiled_flex
from flexsample.layout import make_layout
from flexsample.paths import SPARSE_DTYPES, dense_reason, record
from flexsample.scores import reduce_tiles, tile_rows, tile_scores
from flexsample.selection import select_stripes

_MAX_HEAD_DIM = 256
#: Logits per step of the CPU sparse path: 64M fp32 = 256 MiB, so memory is O(chunk × S).
CPU_CHUNK_ELEMENTS = 1 << 26


def validate_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    enable_gqa: bool = True,
    scale: object = None,
    longer_query: bool = False,
) -> None:
    """Raise `TypeError`/`ValueError` naming what is wrong with q `[B, Hq, Sq, D]`,
    k `[B, Hkv, Skv, D]`, v `[B, Hkv, Skv, Dv]` or `scale` (a finite number or None).
    `longer_query` accepts Sq > Skv (SDPA does; the op that replaces SDPA calls must too)."""
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
    if seq_q > seq_kv and not longer_query:
        raise ValueError(f"query length {seq_q} exceeds key length {seq_kv}: not a causal prefill")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads {heads} must be a multiple of key/value heads {kv_heads}")
    if heads != kv_heads and not enable_gqa:
        raise ValueError(
            f"query heads {heads} != key/value heads {kv_heads}: pass enable_gqa=True for GQA"
        )
    resolve_scale(q, scale)


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA `[B, Hq, Sq, Dv]` with the causal rule aligned to the END of the keys: query row i
    sees keys up to `Skv - Sq + i` (a prefill when Sq == Skv, else a cached chunk or a decode
    step). SDPA's own `is_causal=True` aligns to the top-left instead."""
    seq_q, seq_kv = q.shape[2], k.shape[2]
    if seq_q == seq_kv:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
    if seq_q == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=enable_gqa)
    mask = causal_padding_mask(seq_q, seq_kv, device=q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa
    )


def resolve_scale(q: torch.Tensor, scale: object) -> float:
    """The softmax scale: `scale`, or 1/sqrt(D) for None; anything else non-finite raises."""
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
    for_backward: bool | None = None,
) -> BlockMask:
    """SampleAttention's causal block mask for q `[B, Hq, S, D]` and k `[B, Hkv, S, D]`, chosen
    by `config.estimator`: window ∪ stripes (§2-§4) or the antidiagonal estimate (§9).

    The mask has one row of blocks per query head (`[B, Hq, nQ, nKV]`), for `flex_attention`
    with `enable_gqa=True` when Hq != Hkv. Built on q's device with no host sync.
    `for_backward`: also build the transposed block lists that flex's backward reads (None:
    when grad mode is on and q or k requires grad; pass True when only v does).
    """
    config = as_config(config)
    validate_inputs(q, k, scale=scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"a causal prefill mask needs equal lengths, got q {q.shape[2]} and k {k.shape[2]}"
        )
    if q.dtype not in SPARSE_DTYPES:
        raise TypeError(f"dtype {q.dtype} has no sparse kernel: allowed {SPARSE_DTYPES}")
    # Backward through flex_attention needs the transposed (q-block) indices.
    needs_grad = for_backward
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    with torch.no_grad():
        if config.estimator == "antidiagonal":
            est = antidiagonal_scores(q, k, config, resolve_scale(q, scale))
            keep, lists = selected_lists(est, q.shape[2], config, heads=q.shape[1])
            return keep_block_mask(
                keep, q.shape[2], config, compute_q_blocks=needs_grad, lists=lists
            )
        layout = make_layout(config, q.shape[2], q.device)
        tiles = tile_scores(q, k, layout, resolve_scale(q, scale))
        scores, covered = reduce_tiles(*tiles, layout)
        stripes = select_stripes(scores, covered, config, (*tiles, tile_rows(layout)))
        return build_block_mask(stripes, layout, compute_q_blocks=needs_grad)


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

    CUDA: compiled flex_attention. Elsewhere: `cpu_block_sparse_attention`, since
    flex_attention's unfused CPU path materialises S×S scores and vmaps the mask_mod (which
    fails inside a custom op's dispatch, i.e. the compiler path).
    """
    if q.device.type != "cuda":
        return cpu_block_sparse_attention(q, k, v, block_mask, scale=scale)
    kwargs = {
        "block_mask": block_mask,
        "scale": scale,
        "enable_gqa": enable_gqa,
        "kernel_options": kernel_options,
    }
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, **kwargs)
    return run_compiled_flex(q, k, v, **kwargs)


def cpu_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    chunk_elements: int = CPU_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Attention `[B, Hq, S, Dv]` under a causal BlockMask, chunk of query rows by chunk: memory
    O(chunk × S), never S×S; differentiable by autograd. q `[B, Hq, S, D]`, k/v `[B, Hkv, S, D]`.

    Dropped keys are excluded with `where`, not by adding -inf, so a non-finite value in a key
    no row may see cannot reach that row (SDPA's causal kernel skips such keys too).
    """
    batch, heads, seq_len, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    scale = resolve_scale(q, scale)
    q_block, kv_block = block_mask.BLOCK_SIZE
    keep = kept_blocks(block_mask)
    rows_per_chunk = max(1, chunk_elements // max(1, batch * heads * seq_len))
    outputs = []
    for start in range(0, seq_len, rows_per_chunk):
        stop = min(seq_len, start + rows_per_chunk)  # causal: rows below `stop` see keys < stop
        rows = torch.arange(start, stop, device=q.device)
        keys = torch.arange(stop, device=q.device)
        allowed = keep[:, :, rows // q_block][..., keys // kv_block] & (keys <= rows[:, None])
        # [B, Hkv, group, rows, D] against [B, Hkv, 1, keys, D]: GQA without copying k or v.
        qc = q[:, :, start:stop].float().unflatten(1, (kv_heads, group))
        logits = qc @ k[:, :, None, :stop].float().transpose(-1, -2) * scale
        logits = torch.where(allowed.unflatten(1, (kv_heads, group)), logits, float("-inf"))
        probs = torch.softmax(logits, -1)
        outputs.append((probs @ v[:, :, None, :stop].float()).flatten(1, 2))
    return torch.cat(outputs, 2).to(q.dtype)


def sample_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SampleConfig | None = None,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Causal SampleAttention: q `[B, Hq, Sq, D]`, k/v `[B, Hkv, Skv, D(v)]` -> `[B, Hq, Sq, Dv]`.

    For a prefill (Sq == Skv) the contract of `scaled_dot_product_attention(q, k, v,
    is_causal=True, scale=scale, enable_gqa=enable_gqa)`, sparse where it applies. A shorter
    query (a cached chunk, a decode step) runs dense with the causal rule aligned to the END
    of the keys (`dense_causal_attention`), which is what a cached chunk needs; SDPA's
    `is_causal=True` would align it to the top-left. Differentiable on every path.
    """
    config = as_config(config)
    validate_inputs(q, k, v, enable_gqa=enable_gqa, scale=scale)
    reason = dense_reason(q, k, config)
    record(reason, tuple(q.shape))
    if reason is not None:
        return dense_causal_attention(q, k, v, scale=scale, enable_gqa=enable_gqa)
    return sparse_attention(q, k, v, config, scale=scale)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SampleConfig,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """The sparse path alone, for a causal prefill the caller has already routed here
    (`paths.dense_reason` is None): SampleAttention's mask, then attention under it.
    q `[B, Hq, S, D]`, k/v `[B, Hkv, S, D(v)]` -> `[B, Hq, S, Dv]`."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    block_mask = sample_block_mask(q, k, config, scale=scale, for_backward=needs_grad)
    return attention_under_sample_mask(q, k, v, block_mask, config, scale=scale)


def attention_under_sample_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    config: SampleConfig,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention `[B, Hq, S, Dv]` under `sample_block_mask(q, k, config)`'s mask as the sparse
    path runs it: on CUDA under the plain causal mask_mod, the dense tail's rows split apart
    (`tail.py`; this rewrites the mask's tail rows in place, the same way on every call)."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    options = kernel_options(q, config, k=k, v=v, block_mask=block_mask)
    scale = resolve_scale(q, scale)
    if q.is_cuda and not needs_grad:  # the swap drops the transposed lists backward reads
        block_mask = with_causal_mask_mod(block_mask)
        if not torch.compiler.is_compiling():
            split = tail.plan(
                q.shape, config, tail.sm_count(q.device.index), replayed=tail.replaying()
            )
            if split is not None:
                return tail.attention_split(
                    q, k, v, block_mask, split, scale=scale, kernel_options=options
                )
    return attention_with_mask(
        q,
        k,
        v,
        block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=options,
    )
