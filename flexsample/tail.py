"""The dense tail's rows (ALGORITHM §9, `dense_tail`) computed with their keys split in parts.

In the mask, each query block holding one of the last `dense_tail` rows keeps every causal
key block. flex's kernels (Triton and FLASH) give a query block's row to one program, so that
program walks all nQ key blocks while a typical one walks a few dozen, and it ends the launch
alone: at 32K the tail cost FLASH 1.00 -> 1.36 ms where its area is 0.8% of the causal blocks
(H100, ALGORITHM §9). Here, on CUDA:
1. the tail rows keep only their diagonal square (query blocks `first_block..nQ-1` against key
   blocks `first_block..` and causal) in the mask that the main flex call runs, which also
   returns its log-sum-exp;
2. the rectangle of earlier keys `[0, first_row)` runs as one dense flex call per batch element
   whose batch is `parts` equal slices of those keys (strided views of k and v, no copy) and
   the tail rows repeated, so `parts x Hq` programs share it;
3. the square and the parts are merged by log-sum-exp into the tail rows of the output.
The result is the same attention (the tail rows stay exact), in another summation order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask

from flexsample.config import SampleConfig
from flexsample.flex_backend import run_compiled_flex
from flexsample.merge import merge_by_lse

#: Fewest key blocks per part, and programs aimed at per launch of the rectangle in multiples
#: of the SM count. Not tuned by a kept measurement: in a one-off profile (H200, eager, so
#: host-bound) 4, 8, 16 and 32 parts cost the same at 32K and 128K.
MIN_PART_BLOCKS = 8
WAVES = 2
#: The rectangle's query rows are padded to a multiple of this (flex's block size).
_ROW_MULTIPLE = 128
#: Fewest tail-free query blocks (rows before the tail / q_block) for the split of a path that
#: is not replayed. Run eagerly, the rectangle's flex call and merge add host time that short
#: prefills do not hide (H200, Llama-3-8B shape, bench/results/tail_split.md: at 32K FLASH
#: sparse attention 1.34 ms unsplit, 1.36 split, Triton 2.39 -> 2.16; tail_split_64k.md: at
#: 128K FLASH 9.98 -> 9.25, Triton 17.4 -> 15.7). In the op's own replay (up to
#: `graph_max_len`, `for_replay`) host time is gone and any length splits (op_graphs_tail.md:
#: 32K synced 3.63 -> 3.35 ms, real-text shape 1.29 -> 0.897). 768 lies between the measured
#: 255 and 1023; 64K (511) was not measured and runs unsplit eagerly.
EAGER_MIN_BLOCKS = 768


@dataclasses.dataclass(frozen=True)
class TailPlan:
    """first_block: the first tail query block; first_row = first_block x q_block (the rows
    from here on are tail rows); parts: the key parts of the rectangle, a power of two."""

    first_block: int
    first_row: int
    parts: int


def plan(
    shape: torch.Size, config: SampleConfig, sm_count: int, *, replayed: bool
) -> TailPlan | None:
    """The split of a prefill of q shape `[B, Hq, S, D]`, or None where it does not apply: no
    tail (stripes estimator, `dense_tail` 0), `split_tail` off, `q_block != kv_block`, a
    rectangle too short for two parts of `MIN_PART_BLOCKS` blocks, or, for a path that will not
    be replayed, fewer than `EAGER_MIN_BLOCKS` blocks before the tail. Parts: the fewest bringing
    `Hq x tail blocks x parts` to `WAVES x sm_count` programs, a power of two, at most the
    largest power of two dividing `first_row` (equal slices of whole keys)."""
    _, heads, seq_len, _ = shape
    if config.estimator != "antidiagonal" or config.dense_tail == 0 or not config.split_tail:
        return None
    if config.q_block != config.kv_block:
        return None
    first_block = max(0, seq_len - config.dense_tail) // config.q_block
    tail_blocks = -(-seq_len // config.q_block) - first_block
    most = first_block // MIN_PART_BLOCKS
    if most < 2 or (not replayed and first_block < EAGER_MIN_BLOCKS):
        return None
    first_row = first_block * config.q_block
    wanted = -(-WAVES * sm_count // (heads * tail_blocks))
    parts = min(1 << max(0, wanted - 1).bit_length(), 1 << (most.bit_length() - 1))
    parts = min(parts, first_row & -first_row)  # a power of two dividing first_row
    if parts < 2:
        return None
    return TailPlan(first_block, first_row, parts)


_replay = threading.local()


@contextlib.contextmanager
def for_replay() -> Iterator[None]:
    """Plans made inside (the op's own warm-up and capture, `graphs.py`) are for a CUDA-graph
    replay: they split at any length. Not a user's capture: its warm-up runs eagerly, and a
    capture that planned otherwise would compile inside the capture."""
    previous = getattr(_replay, "on", False)
    _replay.on = True
    try:
        yield
    finally:
        _replay.on = previous


def replaying() -> bool:
    """Whether this thread is inside `for_replay`."""
    return getattr(_replay, "on", False)


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index`."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def keep_square_only(block_mask: BlockMask, tail: TailPlan, local_first: int | None = None) -> None:
    """In place: the tail query blocks of a flexsample mask keep only their causal square, key
    blocks `first_block..` (full below the diagonal, the diagonal partial). `local_first`: the
    mask's own index of the first tail query block where its rows are a shard ending with the
    tail (context parallel), else `first_block`. Needs `q_block == kv_block` and lists the
    caller owns (not shared views)."""
    first = tail.first_block
    local = first if local_first is None else local_first
    kv_num, kv_idx = block_mask.kv_num_blocks, block_mask.kv_indices
    full_num, full_idx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    rows = kv_num.shape[-1] - local
    device = kv_num.device
    kv_num[..., local:] = 1
    kv_idx[..., local:, 0] = torch.arange(first, first + rows, device=device, dtype=kv_idx.dtype)
    full_num[..., local:] = torch.arange(rows, device=device, dtype=full_num.dtype)
    full_idx[..., local:, :rows] = torch.arange(
        first, first + rows, device=device, dtype=full_idx.dtype
    )


def attention_split(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    tail: TailPlan,
    *,
    scale: float,
    kernel_options: dict | None,
    local_first_row: int | None = None,
) -> torch.Tensor:
    """Attention `[B, Hq, L, Dv]` of q `[B, Hq, L, D]` over k/v `[B, Hkv, S, D(v)]` under a
    flexsample mask whose tail rows keep every causal block, with those rows run apart: steps
    1-3 of the module docstring. Rewrites the mask's tail rows in place (`keep_square_only`).
    `local_first_row` as in `add_rectangle`. CUDA, forward, not traced (the compiled flex's
    LSE)."""
    first_block = None
    if local_first_row is not None:
        first_block = local_first_row // block_mask.BLOCK_SIZE[0]
    keep_square_only(block_mask, tail, first_block)
    out, aux = run_compiled_flex(
        q,
        k,
        v,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=kernel_options,
        return_aux=AuxRequest(lse=True),
    )
    add_rectangle(
        out,
        aux.lse,
        q,
        k,
        v,
        tail,
        scale=scale,
        kernel_options=kernel_options,
        local_first_row=local_first_row,
    )
    return out


def add_rectangle(
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tail: TailPlan,
    *,
    scale: float,
    kernel_options: dict | None,
    local_first_row: int | None = None,
) -> None:
    """In place: `out` `[B, Hq, S, Dv]` and its log-sum-exp `lse` `[B, Hq, S]` hold the tail
    rows' attention over their square only; add the keys `[0, first_row)` (k/v `[B, Hkv, S,
    D(v)]`, `parts` slices in one flex call per batch element) by log-sum-exp (natural log,
    as `run_compiled_flex` returns it). `local_first_row`: q's own row of the first tail row
    where q holds a shard ending with the tail (context parallel; k/v hold every key)."""
    first = tail.first_row if local_first_row is None else local_first_row
    count = q.shape[2] - first
    # Whole blocks of rows, so that the compiled (dynamic) Triton flex does not compile again
    # for a tail that ends mid-block; the padding rows are zero queries, dropped below.
    padded = -(-count // _ROW_MULTIPLE) * _ROW_MULTIPLE
    for b in range(q.shape[0]):
        rows = F.pad(q[b, :, first:], (0, 0, 0, padded - count))
        rows = rows.expand(tail.parts, -1, -1, -1).contiguous()
        keys, values = (_key_parts(x[b], tail.parts, tail.first_row) for x in (k, v))
        part_out, aux = run_compiled_flex(
            rows,
            keys,
            values,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
            kernel_options=kernel_options,
            return_aux=AuxRequest(lse=True),
        )
        # `lse` keeps the square's values: nothing reads it after the merge.
        square = (out[b, :, first:][None], lse[b, :, first:][None])
        parts = (part_out[:, :, :count], aux.lse[:, :, :count])
        out[b, :, first:] = merge_by_lse([square, parts])[0]


def _key_parts(x: torch.Tensor, parts: int, length: int) -> torch.Tensor:
    """`[H, S, D]` -> `[parts, H, length / parts, D]`: rows `[0, length)` in equal slices, a
    strided view (the slices become a batch)."""
    heads, _, dim = x.shape
    if length % parts:
        raise ValueError(f"{parts} parts do not divide {length} keys")
    size = length // parts
    head_stride, row_stride, dim_stride = x.stride()
    return x.as_strided(
        (parts, heads, size, dim),
        (size * row_stride, head_stride, row_stride, dim_stride),
        x.storage_offset(),
    )
