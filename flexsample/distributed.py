"""Context parallelism: SampleAttention over a sequence sharded across ranks.

Layout ("zigzag", load-balanced for causal attention): the sequence is cut into `2W` chunks of
whole `block`-row blocks (`block` = the config's `q_block`), and rank `r` of `W` holds chunks
`r` and `2W-1-r`, in that order. Causal work grows with the row index, so each rank gets one
cheap and one expensive chunk. A length that is not a multiple of `2W*block` is not padded:
chunk `c` is blocks `[c*nQ // 2W, (c+1)*nQ // 2W)` of the `nQ = ceil(S / block)` query blocks,
so chunks differ by at most one block and only the last chunk (rank 0's second) may end in a
partial block. Every chunk boundary is then a block boundary, so each local query block is
exactly one global query block, and the mask and its block lists carry over unchanged.

Per call (`context_parallel_sample_attention`), every rank all-gathers K and V (shards padded
to one length, then put back in sequence order; V's transfer overlaps the mask build, which
needs only K). With the antidiagonal estimator (the default,
ALGORITHM §9) each query block's estimate and selection need only its own rows and the keys
before them: each chunk is scored at its global rows against all keys (`q_blocks`), with no
collective, and its kept blocks become the shard's BlockMask. With the stripes (§2-§4):
1. (K and V gathered as above);
2. computes stage 1 for the sampled rows of the GLOBAL layout (`config.sampled_rows(S)`)
   that lie in its own chunks, against all keys, as un-normalised sums (ALGORITHM §2);
3. all-reduces those sums and divides by the global sampled-row count, so every rank holds
   the scores and covered mass of single-process SampleAttention, up to fp summation order;
4. selects the stripes (`selection.select_stripes`, identical on every rank) and builds the
   BlockMask of its own query blocks against all keys (Q_LEN = shard, KV_LEN = S);
5. runs attention for its shard: compiled flex_attention on CUDA (the rank whose rows end
   the sequence runs the dense tail's rows apart, as single-GPU flexsample does: `tail.py`),
   chunks of rows elsewhere.
Window bounds, sampled rows, selection and mask are the global ones: the result equals
`sample_attention` on the whole sequence with the same config. Forward only (prefill): the
collectives here have no autograd. Memory is O(S) for K/V, O(chunk x S) for scores and the
CPU path, and `[B, Hq, nQ_local, nKV]` for the block lists; never S x S.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from flexsample import attention as _attention
from flexsample import fp8, tail
from flexsample.antidiagonal import antidiagonal_scores, selected_lists
from flexsample.block_mask import _ascending, keep_block_mask, kept_blocks, sampled_causal_mask_mod
from flexsample.config import SampleConfig, as_config
from flexsample.flex_backend import kernel_options
from flexsample.layout import Layout, make_layout
from flexsample.merge import merge_by_lse
from flexsample.paths import SPARSE_DEVICES, SPARSE_DTYPES, record
from flexsample.scores import block_scores
from flexsample.selection import select_stripes

#: Logits per step of the CPU shard path (read at call time, so tests can shrink it).
CPU_CHUNK_ELEMENTS = _attention.CPU_CHUNK_ELEMENTS


@dataclasses.dataclass(frozen=True)
class Shard:
    """Rank `rank`'s rows of a zigzag-sharded sequence of `seq_len` tokens.

    chunks: its two global row ranges `[start, end)`, chunk `rank` then chunk `2W-1-rank`;
    the local rows are the first chunk's rows followed by the second's.
    """

    seq_len: int
    rank: int
    world: int
    block: int
    chunks: tuple[tuple[int, int], tuple[int, int]]

    @property
    def length(self) -> int:
        """Rows on this rank."""
        return sum(end - start for start, end in self.chunks)

    def local_offsets(self) -> tuple[int, int]:
        """Local row of each chunk's first row (0, then the first chunk's length)."""
        return 0, self.chunks[0][1] - self.chunks[0][0]

    def q_blocks(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Global query-block index of each local query block, `[nQ_local]` (int64)."""
        return torch.cat(
            [
                torch.arange(start // self.block, -(-end // self.block), device=device)
                for start, end in self.chunks
            ]
        )


def zigzag_chunks(seq_len: int, world: int, block: int = 128) -> list[tuple[int, int]]:
    """The `2W` chunks `[start, end)` of the zigzag layout: whole blocks, sizes within one
    block of each other, the last chunk ending at `seq_len` (possibly mid-block)."""
    if world < 1 or block < 1:
        raise ValueError(f"world ({world}) and block ({block}) must be >= 1")
    num_blocks, parts = -(-seq_len // block), 2 * world
    if num_blocks < parts:
        raise ValueError(
            f"sequence of {seq_len} tokens has {num_blocks} blocks of {block}: too short to "
            f"shard over {world} ranks (needs >= {parts} blocks, two chunks per rank)"
        )
    edges = [min(seq_len, (c * num_blocks // parts) * block) for c in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def shard_layout(seq_len: int, rank: int, world: int, block: int = 128) -> Shard:
    """Rank `rank`'s `Shard` of the zigzag layout."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is out of range for world size {world}")
    chunks = zigzag_chunks(seq_len, world, block)
    return Shard(seq_len, rank, world, block, (chunks[rank], chunks[2 * world - 1 - rank]))


def shard_sequence(
    x: torch.Tensor, rank: int, world: int, *, block: int = 128, dim: int = 2
) -> torch.Tensor:
    """Rank `rank`'s zigzag shard of `x` along `dim` (the sequence; `[B, H, S, D]` -> dim 2):
    chunks `rank` and `2W-1-rank` concatenated. Use the config's `q_block` as `block`."""
    shard = shard_layout(x.shape[dim], rank, world, block)
    return torch.cat([x.narrow(dim, s, e - s) for s, e in shard.chunks], dim)


def unshard_sequence(shards: list[torch.Tensor], *, block: int = 128, dim: int = 2) -> torch.Tensor:
    """Inverse of `shard_sequence`: the shards of ranks `0..W-1` -> the whole sequence."""
    world = len(shards)
    seq_len = sum(s.shape[dim] for s in shards)
    return _reassemble([(s, shard_layout(seq_len, r, world, block)) for r, s in enumerate(shards)])


def _reassemble(parts: list[tuple[torch.Tensor, Shard]], dim: int = 2) -> torch.Tensor:
    """Shards (any trailing padding along `dim` ignored) -> the sequence in global order."""
    pieces: dict[int, torch.Tensor] = {}
    for x, shard in parts:
        for offset, (start, end) in zip(shard.local_offsets(), shard.chunks, strict=True):
            pieces[start] = x.narrow(dim, offset, end - start)
    return torch.cat([pieces[start] for start in sorted(pieces)], dim)


def gather_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None, seq_len: int, *, block: int = 128
) -> torch.Tensor:
    """All-gather the zigzag shards `x` `[B, H, L_rank, D]` of every rank of `group` into the
    whole sequence `[B, H, seq_len, D]` (shards are padded to one length for the collective)."""
    return start_gather(x, group, seq_len, block=block)()


def start_gather(
    x: torch.Tensor, group: dist.ProcessGroup | None, seq_len: int, *, block: int = 128
) -> Callable[[], torch.Tensor]:
    """`gather_sequence` started asynchronously: returns the function that waits for the
    all-gather and gives the whole sequence `[B, H, seq_len, D]`. Work queued in between
    overlaps the transfer (on NCCL the collective runs on its own stream)."""
    world = dist.get_world_size(group)
    shards = [shard_layout(seq_len, r, world, block) for r in range(world)]
    longest = max(s.length for s in shards)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[2])).contiguous()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    work = dist.all_gather(gathered, padded, group=group, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        return _reassemble(list(zip(gathered, shards, strict=True)))

    return finish


def _global_length(local_len: int, device: torch.device, group: dist.ProcessGroup | None) -> int:
    """Sum of the ranks' shard lengths (one small all-gather)."""
    world = dist.get_world_size(group)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([local_len], device=device), group=group)
    return int(torch.cat(lengths).sum())


def _at_global_rows(chunk: torch.Tensor, first_row: int, seq_len: int) -> torch.Tensor:
    """A `[B, H, seq_len, D]` view whose rows `first_row .. first_row + L - 1` are `chunk`
    `[B, H, L, D]`, without a seq_len-long copy of q.

    Stage 1 (both `block_scores` paths) reads q only at the rows of `layout.rows` and uses the
    row index for the causal limit and the window, so it needs the sampled rows at their
    global positions. With a row stride of 1 (and a D stride of L) that costs one copy of the
    chunk plus `seq_len` elements of slack. Other rows alias the chunk or zeroed slack: finite
    values, which only pad rows read (the PyTorch path reads row 0 for pads, weighted out).
    """
    batch, heads, length, dim = chunk.shape
    data = batch * heads * dim * length
    buffer = chunk.new_empty(data + seq_len - length)
    buffer[:first_row].zero_()
    buffer[first_row + data :].zero_()
    buffer[first_row : first_row + data].view(batch, heads, dim, length).copy_(
        chunk.transpose(-1, -2)
    )
    return buffer.as_strided(
        (batch, heads, seq_len, dim), (heads * dim * length, dim * length, 1, length)
    )


def _local_score_sums(
    q: torch.Tensor, k: torch.Tensor, layout: Layout, shard: Shard, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 sums over the sampled rows in this rank's chunks: (scores `[B, Hq, nKV]`,
    covered `[B, Hq]`), float32, NOT divided by the row count (ALGORITHM §2 times n_real)."""
    batch, heads = q.shape[:2]
    scores = torch.zeros(batch, heads, layout.num_kv_blocks, device=q.device)
    covered = torch.zeros(batch, heads, device=q.device)
    table = layout.config.sampled_rows(layout.seq_len)  # host copy: no device sync
    for offset, (start, end) in zip(shard.local_offsets(), shard.chunks, strict=True):
        mine = (table >= start) & (table < end)
        tiles = mine.any(1)
        count = int(mine.sum())
        if count == 0:
            continue
        rows = torch.where(mine, table, -1)[tiles].to(q.device)  # this chunk's rows, else -1
        view = _at_global_rows(q[:, :, offset : offset + end - start], start, layout.seq_len)
        chunk_scores, chunk_covered = block_scores(
            view, k, dataclasses.replace(layout, rows=rows), scale
        )
        # block_scores divides by its own row count; undo it to sum across chunks and ranks.
        scores += chunk_scores * count
        covered += chunk_covered * count
    return scores, covered


def shard_block_lists(
    stripes: torch.Tensor, layout: Layout, q_blocks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`block_mask.torch_block_lists` for the global query blocks `q_blocks` `[nQ_local]` only:
    (kv_num `[B, H, nQ_local]`, kv_idx `[B, H, nQ_local, nKV]`, full_num, full_idx), int32,
    equal to those lists' rows `q_blocks` (tested). Same formulas (ALGORITHM §4), with each
    block's first row taken from its global index; the big tensors are int32 throughout."""
    config = layout.config
    lo, hi = layout.win_lo[q_blocks], layout.win_hi[q_blocks]
    num_kv = stripes.shape[-1]
    first_row = q_blocks * config.q_block
    last_full = torch.maximum((first_row + 1) // config.kv_block - 1, lo - 1)
    slot = torch.arange(num_kv, device=stripes.device, dtype=torch.int32)

    before = F.pad(torch.cumsum(stripes, -1, dtype=torch.int32), (1, 0))
    below = before[..., lo]  # [B, H, nQ_local]: stripes below each window start
    # In place where it is free to: at 1M tokens each [B, H, nQ_local, nKV] int32 is 4 GiB.
    full_idx = (lo.int()[:, None] + slot - below[..., None]).clamp_(0, num_kv - 1)
    ascending = _ascending(stripes).int()[:, :, None, :]
    torch.where(slot < below[..., None], ascending, full_idx, out=full_idx)
    full_num = below + (torch.minimum(hi, last_full) - lo + 1).int()
    partial_first = torch.maximum(lo, last_full + 1).int()
    # Materialised, not expanded views: flex's compiled kernel reads these lists with their
    # head and batch strides taken as dense, and zero strides gave wrong rows (the first 2-GPU
    # run: relative RMS error 0.244 at 64K; reproduced with CPU inductor, tested).
    kv_num = (hi.int() - partial_first + 1).expand_as(full_num).contiguous()
    kv_idx = (partial_first[:, None] + slot).clamp(max=num_kv - 1).expand_as(full_idx)
    return kv_num, kv_idx.contiguous(), full_num, full_idx


def _shard_mask_mod(stripes: torch.Tensor, layout: Layout, shard: Shard):
    """SampleAttention's mask_mod with local query rows mapped to their global rows."""
    inner = sampled_causal_mask_mod(stripes, layout.win_lo, layout.config)
    (_, second), first_len = shard.chunks, shard.local_offsets()[1]

    def shard_sampled_causal(b, h, q_idx, kv_idx):
        row = torch.where(
            q_idx < first_len, q_idx + shard.chunks[0][0], q_idx - first_len + second[0]
        )
        return inner(b, h, row, kv_idx)

    return shard_sampled_causal


def shard_block_mask(stripes: torch.Tensor, layout: Layout, shard: Shard) -> BlockMask:
    """The causal BlockMask of `shard`'s query rows against all `S` keys (window ∪ `stripes`
    `[B, Hq, nKV]`): `[B, Hq, nQ_local, nKV]` blocks, seq_lengths `(L, S)`."""
    config = layout.config
    return BlockMask.from_kv_blocks(
        *shard_block_lists(stripes, layout, shard.q_blocks(stripes.device)),
        BLOCK_SIZE=(config.q_block, config.kv_block),
        mask_mod=_shard_mask_mod(stripes, layout, shard),
        seq_lengths=(shard.length, layout.seq_len),
        # Forward only, as build_block_mask: the transposed lists come from a dense
        # [B, Hq, nQ_local, nKV] int64 copy, 8 GiB per rank at 1M tokens (out of memory there).
        compute_q_blocks=False,
    )


def _group_shard(
    seq_len: int, group: dist.ProcessGroup | None, block: int, local_len: int
) -> Shard:
    shard = shard_layout(seq_len, dist.get_rank(group), dist.get_world_size(group), block)
    if shard.length != local_len:
        raise ValueError(
            f"rank {shard.rank} holds {local_len} rows, but the zigzag layout of {seq_len} "
            f"tokens over {shard.world} ranks with block {block} gives it {shard.length}: "
            "shard with flexsample.distributed.shard_sequence(x, rank, world, block=q_block)"
        )
    return shard


def context_parallel_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SampleConfig | None = None,
    group: dist.ProcessGroup | None = None,
    *,
    scale: float | None = None,
) -> BlockMask:
    """This rank's SampleAttention BlockMask: q `[B, Hq, L, D]` its zigzag shard, k
    `[B, Hkv, S, D]` ALL keys (`gather_sequence`). Stripes: one all-reduce (the stage-1 sums);
    antidiagonal: none (with `estimate_fp8`, one of q's `[B, Hq]` fp8 scales). Blocks
    `[B, Hq, nQ_local, nKV]`, equal to rows `Shard.q_blocks()` of `sample_block_mask`."""
    config = as_config(config)
    shard = _group_shard(k.shape[2], group, config.q_block, q.shape[2])
    if config.estimator == "antidiagonal":
        with torch.no_grad():
            q_scales = None
            if config.estimate_fp8:
                # The whole sequence's scale per head, as single-GPU flexsample rounds q.
                q_scales = fp8.head_scales(q)
                dist.all_reduce(q_scales, op=dist.ReduceOp.MIN, group=group)
            return _antidiagonal_shard_mask(q, k, config, shard, scale, q_scales)
    with torch.no_grad():
        layout = make_layout(config, k.shape[2], q.device)
        scores, covered = _local_score_sums(q, k, layout, shard, _attention.resolve_scale(q, scale))
        # One collective for both sums: [B, Hq, nKV + 1].
        sums = torch.cat([scores, covered[..., None]], -1)
        dist.all_reduce(sums, group=group)
        n_real = int((layout.config.sampled_rows(k.shape[2]) >= 0).sum())
        scores, covered = sums[..., :-1] / n_real, sums[..., -1] / n_real
        return shard_block_mask(select_stripes(scores, covered, config), layout, shard)


def _antidiagonal_shard_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SampleConfig,
    shard: Shard,
    scale: float | None,
    q_scales: torch.Tensor | None = None,
) -> BlockMask:
    """The antidiagonal estimator's mask of this rank's query blocks (ALGORITHM §9): each query
    block's estimate and selection need only its own rows and the keys before them, so each
    chunk (rows in place: `q_row0`) is scored against all keys, with no collective
    (`q_scales`: the fp8 scales of the whole sequence's q, `antidiagonal_scores`)."""
    seq_len, scale = k.shape[2], _attention.resolve_scale(q, scale)
    keeps, lists, rows = [], [], []
    for offset, (start, end) in zip(shard.local_offsets(), shard.chunks, strict=True):
        first, last = start // config.q_block, -(-end // config.q_block)
        chunk = q[:, :, offset : offset + end - start]
        est = antidiagonal_scores(
            chunk, k, config, scale, q_blocks=(first, last), q_row0=start, q_scales=q_scales
        )
        keep, chunk_lists = selected_lists(
            est, seq_len, config, first_block=first, heads=q.shape[1]
        )
        keeps.append(keep)
        lists.append(chunk_lists)
        rows.append(torch.arange(start, end, device=q.device))
    return keep_block_mask(
        torch.cat(keeps, 2),
        seq_len,
        config,
        compute_q_blocks=False,
        rows=torch.cat(rows),
        lists=tuple(torch.cat(parts, 2) for parts in zip(*lists, strict=True)),
    )


def shard_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    shard: Shard,
    config: SampleConfig | None = None,
    *,
    scale: float | None = None,
    split_tail: bool = False,
) -> torch.Tensor:
    """Attention of the shard's rows q `[B, Hq, L, D]` over all keys k/v `[B, Hkv, S, D(v)]`
    under a shard BlockMask (`shard_block_mask`, `context_parallel_block_mask`): `[B, Hq, L,
    Dv]`. CUDA: compiled flex_attention (Q_LEN != KV_LEN); elsewhere chunks of rows, O(chunk x
    S) memory. `split_tail`: the mask is `context_parallel_block_mask`'s with `config` (its
    tail rows dense); on the rank holding the tail, run them apart as `tail.py` does,
    rewriting those rows of the mask in place."""
    scale = _attention.resolve_scale(q, scale)
    if q.device.type == "cuda":
        config = as_config(config)
        options = kernel_options(q, config, k=k, v=v, block_mask=block_mask)
        split = _shard_tail(q, k, v, shard, config) if split_tail else None
        if split is not None:
            return tail.attention_split(
                q,
                k,
                v,
                block_mask,
                split,
                scale=scale,
                kernel_options=options,
                local_first_row=_local_row(shard, split.first_row),
            )
        return _attention.attention_with_mask(
            q,
            k,
            v,
            block_mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
            kernel_options=options,
        )
    return _cpu_shard_attention(
        q, k, v, shard, scale, kept_blocks(block_mask), block_mask.BLOCK_SIZE[1]
    )


def _shard_tail(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shard: Shard, config: SampleConfig
) -> tail.TailPlan | None:
    """The dense tail's split (`tail.py`, as single-GPU flexsample plans it for the whole
    sequence) where this rank holds the tail: its second chunk ends the sequence and holds
    every tail row. Forward, eager, CUDA only."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return None
    if shard.chunks[1][1] != shard.seq_len or torch.compiler.is_compiling():
        return None
    shape = torch.Size([q.shape[0], q.shape[1], shard.seq_len, q.shape[3]])
    split = tail.plan(shape, config, tail.sm_count(q.device.index), replayed=False)
    if split is None or split.first_row < shard.chunks[1][0] or config.q_block != shard.block:
        return None
    return split


def _local_row(shard: Shard, row: int) -> int:
    """The shard's own index of global `row`, which lies in its second chunk."""
    start, _ = shard.chunks[1]
    return shard.local_offsets()[1] + row - start


def _cpu_shard_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shard: Shard,
    scale: float,
    keep: torch.Tensor | None = None,
    kv_block: int = 1,
) -> torch.Tensor:
    """`attention.cpu_block_sparse_attention` for a shard: each chunk's rows at their global
    offset; `keep` `[B, Hq, nQ_local, nKV]` of `kv_block`-key blocks (None: causal only, the
    dense baseline). Memory O(chunk x S)."""
    batch, heads, _, _ = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    rows_per_step = max(1, CPU_CHUNK_ELEMENTS // max(1, batch * heads * k.shape[2]))
    outputs = []
    for offset, (first, last) in zip(shard.local_offsets(), shard.chunks, strict=True):
        for start in range(first, last, rows_per_step):
            stop = min(last, start + rows_per_step)  # causal: these rows see keys < stop
            rows = torch.arange(start, stop, device=q.device)
            keys = torch.arange(stop, device=q.device)
            allowed = (keys <= rows[:, None]).expand(batch, heads, -1, -1)
            if keep is not None:
                local_block = (rows - first + offset) // shard.block
                allowed = allowed & keep[:, :, local_block][..., keys // kv_block]
            local = q[:, :, start - first + offset : stop - first + offset]
            # [B, Hkv, group, rows, D] against [B, Hkv, 1, keys, D]: GQA without copying k or v.
            logits = local.float().unflatten(1, (kv_heads, group)) @ k[
                :, :, None, :stop
            ].float().transpose(-1, -2)
            logits = torch.where(allowed.unflatten(1, (kv_heads, group)), logits * scale, -math.inf)
            probs = torch.softmax(logits, -1)
            outputs.append((probs @ v[:, :, None, :stop].float()).flatten(1, 2))
    return torch.cat(outputs, 2).to(q.dtype)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: object) -> None:
    _attention.validate_inputs(q, k, v, enable_gqa=True, scale=scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k, v shards must hold the same rows: q {q.shape[2]}, k {k.shape[2]}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("context parallel attention is forward-only (prefill): no autograd")


def context_parallel_sample_attention(
    q_shard: torch.Tensor,
    k_shard: torch.Tensor,
    v_shard: torch.Tensor,
    config: SampleConfig | None = None,
    group: dist.ProcessGroup | None = None,
    *,
    scale: float | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Causal SampleAttention of a zigzag-sharded prefill: this rank's q `[B, Hq, L, D]`,
    k/v `[B, Hkv, L, D(v)]` (`shard_sequence(x, rank, world, block=config.q_block)`) ->
    its output rows `[B, Hq, L, Dv]`. Equals `shard_sequence(sample_attention(q, k, v, config,
    enable_gqa=True))` of the whole sequence up to fp rounding; every rank of `group` must
    call it. `seq_len` (the whole length) saves one small all-gather; it must be right on every
    rank (a wrong one fails on some ranks only, and the others wait in the next collective).
    Runs dense (`context_parallel_dense_attention`) where `sample_attention` would: S <
    min_seq_len, or a dtype or device without a sparse kernel (counted in `path_counts`)."""
    config = as_config(config)
    _check_inputs(q_shard, k_shard, v_shard, scale)
    if seq_len is None:
        seq_len = _global_length(q_shard.shape[2], q_shard.device, group)
    shard = _group_shard(seq_len, group, config.q_block, q_shard.shape[2])
    reason = None
    if seq_len < config.min_seq_len:
        reason = "short"
    elif q_shard.dtype not in SPARSE_DTYPES:
        reason = f"dtype:{str(q_shard.dtype).removeprefix('torch.')}"
    elif q_shard.device.type not in SPARSE_DEVICES:
        reason = f"device:{q_shard.device.type}"
    record(reason, (*q_shard.shape[:2], seq_len, q_shard.shape[3]))
    if reason is not None:
        return context_parallel_dense_attention(
            q_shard, k_shard, v_shard, group, scale=scale, block=config.q_block, seq_len=seq_len
        )
    k = gather_sequence(k_shard, group, seq_len, block=config.q_block)
    # The mask needs only K: V's transfer overlaps the mask build.
    finish_v = start_gather(v_shard, group, seq_len, block=config.q_block)
    block_mask = context_parallel_block_mask(q_shard, k, config, group, scale=scale)
    v = finish_v()
    return shard_attention(q_shard, k, v, block_mask, shard, config, scale=scale, split_tail=True)


def context_parallel_dense_attention(
    q_shard: torch.Tensor,
    k_shard: torch.Tensor,
    v_shard: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    scale: float | None = None,
    block: int = 128,
    seq_len: int | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Dense causal attention of a zigzag-sharded prefill (the baseline, same layout): all-gather
    K/V, then each rank its own rows, `[B, Hq, L, Dv]`. `kernel` on CUDA:
    - "cudnn": per chunk `[first, last)`, cuDNN attention of its rows over the causal square
      `[first, last)` and over the rectangle of keys `< first`, merged by their log-sum-exps
      (K/V expanded to Hq heads: cuDNN takes no GQA here);
    - "sdpa": SDPA per chunk with the causal rule aligned to the end of the chunk's key prefix
      (`causal_lower_right`, which only FlashAttention computes without a materialised mask);
    - "flex": flex_attention over every causal block of the shard (the sparse path's kernel);
    - "auto": "cudnn" where cuDNN attention takes these inputs, else "sdpa" where
      FlashAttention does, else "flex". cuDNN needs K/V expanded to Hq heads: with Hq/Hkv = g,
      g times their memory (16 GiB more at 1M tokens for the Llama-3-8B shape); pass "sdpa" or
      "flex" where that does not fit.
    Off CUDA: chunks of rows, O(chunk x S) memory, whatever `kernel`."""
    if kernel not in DENSE_KERNELS:
        raise ValueError(f"kernel={kernel!r} is not allowed: use one of {DENSE_KERNELS}")
    _check_inputs(q_shard, k_shard, v_shard, scale)
    if seq_len is None:
        seq_len = _global_length(q_shard.shape[2], q_shard.device, group)
    shard = _group_shard(seq_len, group, block, q_shard.shape[2])
    k = gather_sequence(k_shard, group, seq_len, block=block)
    v = gather_sequence(v_shard, group, seq_len, block=block)
    scale = _attention.resolve_scale(q_shard, scale)
    if q_shard.device.type != "cuda":
        return _cpu_shard_attention(q_shard, k, v, shard, scale)
    if kernel == "auto":
        kernel = (
            "cudnn"
            if _cudnn_can_run(q_shard, v)
            else "sdpa"
            if _flash_can_run(q_shard, k, v)
            else "flex"
        )
    if kernel == "cudnn":
        if not _cudnn_can_run(q_shard, v):
            raise ValueError(
                f"kernel='cudnn': cuDNN attention does not take {q_shard.dtype} inputs of shape "
                f"{tuple(q_shard.shape)} on this GPU; use kernel='auto', 'sdpa' or 'flex'"
            )
        k, v = (_expand_heads(x, q_shard.shape[1]) for x in (k, v))
        return torch.cat(
            [
                prefix_attention(q_shard[:, :, offset : offset + last - first], k, v, first, scale)
                for offset, (first, last) in zip(shard.local_offsets(), shard.chunks, strict=True)
            ],
            2,
        )
    if kernel == "flex":
        config = SampleConfig(estimator="stripes", q_block=block, min_seq_len=0)
        layout = make_layout(config, seq_len, q_shard.device)
        every_block = torch.ones(
            *q_shard.shape[:2], layout.num_kv_blocks, dtype=torch.bool, device=q_shard.device
        )
        mask = shard_block_mask(every_block, layout, shard)
        return shard_attention(q_shard, k, v, mask, shard, config, scale=scale)
    from torch.nn.attention.bias import causal_lower_right

    outputs = []
    for offset, (first, last) in zip(shard.local_offsets(), shard.chunks, strict=True):
        rows = q_shard[:, :, offset : offset + last - first]
        outputs.append(
            F.scaled_dot_product_attention(
                rows,
                k[:, :, :last],
                v[:, :, :last],
                attn_mask=causal_lower_right(last - first, last),
                scale=scale,
                enable_gqa=q_shard.shape[1] != k.shape[1],
            )
        )
    return torch.cat(outputs, 2)


#: The kernels of `context_parallel_dense_attention`.
DENSE_KERNELS = ("auto", "cudnn", "sdpa", "flex")

#: attend(q, k, v, causal, scale) -> (out `[B, H, L, Dv]`, natural log-sum-exp `[B, H, L]` fp32).
Attend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]
]


def cudnn_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN attention (equal head counts; `causal` is top-left aligned) with its log-sum-exp:
    q `[B, H, L, D]`, k/v `[B, H, M, D(v)]` -> (`[B, H, L, Dv]`, `[B, H, L]` fp32)."""
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )
    return out, lse.reshape(out.shape[:-1])


def prefix_attention(
    rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    first: int,
    scale: float,
    attend: Attend = cudnn_attention_with_lse,
) -> torch.Tensor:
    """Causal attention of the global rows `first .. first + L - 1` (`rows` `[B, H, L, D]`) over
    the keys before them, from two dense calls that need no offset causal rule: the causal
    square of their own keys and the rectangle of all earlier keys, merged by log-sum-exp.
    k/v `[B, H, >= first + L, D(v)]` -> `[B, H, L, Dv]` in the rows' dtype."""
    last = first + rows.shape[2]
    out, lse = attend(rows, k[:, :, first:last], v[:, :, first:last], True, scale)
    if first == 0:
        return out
    before = attend(rows, k[:, :, :first], v[:, :, :first], False, scale)
    return merge_by_lse([(x[None], y[None]) for x, y in ((out, lse), before)])[0]


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[B, Hkv, S, D]` -> `[B, heads, S, D]` (each KV head repeated for its query heads), laid
    out `[B, S, H, D]` so that a slice of keys stays a strided view cuDNN reads directly."""
    return x.transpose(1, 2).repeat_interleave(heads // x.shape[1], dim=2).transpose(1, 2)


def _cudnn_can_run(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether cuDNN attention takes q's dtype, device and head dim and v's (K/V expanded to
    q's heads), causal and not."""
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

    rows = q[:, :, :128]
    values = v.new_empty(*rows.shape[:3], v.shape[3])  # laid out as the expanded V
    return all(
        can_use_cudnn_attention(SDPAParams(rows, rows, values, None, 0.0, causal, False))
        for causal in (True, False)
    )


def _flash_can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether SDPA's FlashAttention takes these inputs (the only dense kernel that computes
    `causal_lower_right` without a materialised mask for GQA inputs)."""
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    gqa = q.shape[1] != k.shape[1]
    return can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, gqa))


__all__ = [
    "DENSE_KERNELS",
    "Shard",
    "context_parallel_block_mask",
    "context_parallel_dense_attention",
    "context_parallel_sample_attention",
    "cudnn_attention_with_lse",
    "gather_sequence",
    "prefix_attention",
    "shard_attention",
    "shard_block_lists",
    "shard_block_mask",
    "shard_layout",
    "shard_sequence",
    "start_gather",
    "unshard_sequence",
    "zigzag_chunks",
]
