"""Sparse, or dense and why: the one decision every door takes (ALGORITHM §5).

`sample_attention`, the run-time op behind the compiler pass and the transformers door, and
the benchmarks all ask `dense_reason`; `path_counts` records what ran.
"""

from __future__ import annotations

import collections
import logging

import torch

from flexsample.causal_mask import is_causal_mask
from flexsample.config import SampleConfig
from flexsample.key_mask import KeyMaskReading, read_key_mask

logger = logging.getLogger("flexsample")

#: How often each path ran in eager calls: "sparse" or "dense:<reason>".
path_counts: collections.Counter[str] = collections.Counter()

SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SPARSE_DEVICES = ("cpu", "cuda")


def dense_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SampleConfig,
    attn_mask: torch.Tensor | None = None,
    reading: KeyMaskReading | None = None,
) -> str | None:
    """Why valid inputs q `[B, Hq, Sq, D]`, k `[B, Hkv, Skv, D]` (and a mask, if any) run
    dense, or None when the sparse path applies (`reading`: a 2-D mask's values, if the caller
    has read them).

    `attn_mask` is an SDPA mask (3 or 4 dims), or a 2-D `[B, Skv]` key mask (the transformers
    door's formats: bool padding, True = keep, or integer packed-sequence ids). Cheap checks
    first; a given mask is read last: an SDPA mask runs sparse only if exactly causal, a key
    mask only if it keeps every key (an O(B·S) read; padded or packed batches keep SDPA's
    answer).
    """
    if q.shape[2] != k.shape[2]:
        return "q_len!=kv_len"
    if q.shape[2] < config.min_seq_len:
        return "short"
    if q.dtype not in SPARSE_DTYPES:
        return f"dtype:{str(q.dtype).removeprefix('torch.')}"
    if q.device.type not in SPARSE_DEVICES:
        return f"device:{q.device.type}"
    if attn_mask is None:
        return None
    if attn_mask.dim() == 2:
        if (reading if reading is not None else read_key_mask(attn_mask)).keeps_every_key:
            return None
        return "padding" if attn_mask.dtype == torch.bool else "packed sequences"
    return None if is_causal_mask(attn_mask) else "mask"


def record(reason: str | None, shape: tuple[int, ...]) -> str:
    """Count and log the path a call takes; returns its name ("sparse" or "dense:<reason>")."""
    path = "sparse" if reason is None else f"dense:{reason}"
    if not torch.compiler.is_compiling():
        path_counts[path] += 1
    if reason is not None:
        logger.debug("flexsample: dense attention (%s) for q %s", reason, shape)
    return path
