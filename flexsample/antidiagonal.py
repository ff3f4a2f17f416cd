"""The antidiagonal estimator (ALGORITHM §9): XAttention-style strided antidiagonal scores of
every (query block, key block), and each query block's own shortest set of key blocks.

Stage 1 of SampleAttention sees only ~1% of the rows and keeps one set of column stripes per
head, so rows that copy from their own earlier positions (slash lines) are invisible to it.
Here every query row takes part: an s x s cell of the attention matrix is scored by a
dot product along one of its antidiagonals, and every antidiagonal crosses every column, so
both column and slash patterns reach the estimate at ~1/s of attention's QK^T FLOPs.
On CUDA the Triton kernels of `flexsample/kernels/antidiagonal.py` compute the estimate; the
chunked PyTorch path below serves CPU and traced code. `reference.reference_antidiagonal_scores`
is their spec.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from flexsample import fp8
from flexsample.block_mask import keep_lists
from flexsample.config import SampleConfig
from flexsample.layout import use_kernels
from flexsample.selection import shortest_prefix

#: Temporaries per step. PyTorch path: logits per chunk of query blocks (all heads), 128M =
#: 256 MiB in bf16 plus 512 MiB of fp32 probabilities; memory O(chunk × S/s), never (S/s)².
#: Kernels: fp32 log-sum-exps per launch (512 MiB).
CHUNK_ELEMENTS = 1 << 27
#: Fixed-point bits of the selection's sums (`estimate_units`).
UNIT_BITS = 32


class BlockEstimate(NamedTuple):
    """The antidiagonal estimate of every (query block, key block), `[B, H, nQ, nKV]` float32
    each (H: the query heads, or the KV heads with `group_estimate`). `mass`: the block's
    estimated attention mass, summed over the query block's strided rows (a row of it sums to
    the number of strided rows with a real row). `peak`: the largest share of its own
    estimated mass that any one of those strided rows puts in the key block, in [0, 1] (what
    `row_threshold` reads, §9)."""

    mass: torch.Tensor
    peak: torch.Tensor


def strided_order(stride: int, num_strided: int, device: torch.device | str | None = None):
    """Row offset of segment a of strided query row m: `[num_strided, stride]` (int64).

    Q'[m] = concat_a q[m*s + order[m, a]] against K'[n] = concat_a k[n*s + a] sums q.k over
    the cells (m*s + order[m, a], n*s + a): one antidiagonal of the s x s cell (m, n).
    Even m take XAttention's antidiagonal order[m, a] = s-1-a, whose cells have i - j odd
    (for even s), so a slash line at an even offset would never be scored; odd m take
    order[m, a] = (s - a) % s, whose cells have i - j even. Every q row and every key appear
    once per cell either way, so columns are scored as before.
    """
    a = torch.arange(stride, device=device)
    odd = torch.arange(num_strided, device=device)[:, None] % 2 == 1
    return torch.where(odd, (stride - a) % stride, stride - 1 - a)


def antidiagonal_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SampleConfig,
    scale: float,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
    q_blocks: tuple[int, int] | None = None,
    q_row0: int = 0,
    q_scales: torch.Tensor | None = None,
) -> BlockEstimate:
    """Estimated attention mass of every (query block, key block), and each block's largest
    share of one strided row: `BlockEstimate` of `[B, Hq, nQ, nKV]` float32 tensors (`[B, Hkv,
    ...]` with `group_estimate`, below).

    q `[B, Hq, S, D]`, k `[B, Hkv, S, D]` (GQA: a KV head's query heads share its K', no copy).
    The strided logit of cell (m, n) is `scale` times the max (`cell_score="max"`) or the mean
    ("mean") of q.k over the antidiagonal's cells that are real (row < S) and causal
    (key <= row); each strided row's softmax over n <= m is summed into blocks, so a query
    block's row of `mass` sums to its number of strided rows with a real row; `peak` is the
    largest of those rows' own sums over the key block. The Triton
    kernels where `layout.use_kernels`, else the chunked PyTorch path; `chunk_elements` bounds
    either's temporaries (a chunk's logits, the kernels' per-launch scratch). `q_blocks`
    `(first, end)`: only those query blocks' rows of the result, `[B, Hq, end - first, nKV]`;
    then q may hold only rows `q_row0 .. q_row0 + L - 1` of the sequence (k's length), which
    must cover those blocks' rows (context parallelism: a rank's chunk). With
    `config.estimate_fp8` the scores are those of q and k rounded to e4m3 (`fp8.py`) under
    `fp8.head_scales` of q, or `q_scales` `[B, Hq]` where q is a chunk (the whole sequence's).
    With `config.group_estimate` and GQA the estimate is one per KV head, `[B, Hkv, ...]`,
    from `group_rows` of q (the fp8 scale of a group: its heads' smallest).
    """
    seq_len = k.shape[2]
    num_q = math.ceil(seq_len / config.q_block)
    first, end = (0, num_q) if q_blocks is None else q_blocks
    if not 0 <= first < end <= num_q:
        raise ValueError(f"q_blocks={q_blocks} is not allowed: use 0 <= first < end <= {num_q}")
    rows_needed = (first * config.q_block, min(end * config.q_block, seq_len))
    if q_row0 > rows_needed[0] or q_row0 + q.shape[2] < rows_needed[1]:
        raise ValueError(
            f"q holds rows {q_row0}..{q_row0 + q.shape[2] - 1}, but query blocks {first}..{end - 1}"
            f" need rows {rows_needed[0]}..{rows_needed[1] - 1}"
        )
    call = {"chunk_elements": chunk_elements, "q_blocks": (first, end), "q_row0": q_row0}
    group = q.shape[1] // k.shape[1]
    if config.group_estimate and group > 1:
        if config.estimate_fp8:
            # The group's coarsest scale fits every row the group's strided rows read, and is
            # the same whether q is the whole sequence or a chunk of it (context parallelism).
            q_scales = fp8.head_scales(q) if q_scales is None else q_scales
            q_scales = q_scales.unflatten(1, (-1, group)).amin(-1)
        q = group_rows(q, group, config.stride, q_row0)
    kernels = use_kernels(config, q.device)
    if config.estimate_fp8:
        fast = kernels and fp8.tensor_cores(q.device)
        q8, k8, q_scales, k_scales = fp8.operands(q, k, q_scales, kernel=fast)
        if fast:
            call["head_scale"] = fp8.logit_factor(q_scales, k_scales)
            q, k = q8, k8
        else:
            q, k = fp8.dequantize(q8, q_scales, q.dtype), fp8.dequantize(k8, k_scales, k.dtype)
    if kernels:
        from flexsample.kernels.antidiagonal import triton_antidiagonal_scores

        return triton_antidiagonal_scores(q, k, config, scale, **call)
    return torch_antidiagonal_scores(q, k, config, scale, **call)


def group_rows(q: torch.Tensor, group: int, stride: int, q_row0: int = 0) -> torch.Tensor:
    """q `[B, Hq, L, D]` (rows q_row0.. of the sequence) -> `[B, Hq // group, L, D]`: row i of
    KV head h is row i of query head h * group + ((q_row0 + i) // stride) % group, so strided
    row m of the estimate (rows m*s .. m*s + s - 1) reads query head m mod group of the
    group (`SampleConfig.group_estimate`). A gathered copy: 1/group of q."""
    rows = torch.arange(q.shape[2], device=q.device)
    member = (rows + q_row0) // stride % group
    return q.unflatten(1, (-1, group))[:, :, member, rows]


def torch_antidiagonal_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SampleConfig,
    scale: float,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
    q_blocks: tuple[int, int] | None = None,
    q_row0: int = 0,
) -> BlockEstimate:
    """The PyTorch path of `antidiagonal_scores`: chunks of query blocks keep temporaries
    O(chunk × S/s)."""
    batch, heads, _, dim = q.shape
    seq_len = k.shape[2]
    kv_heads, group = k.shape[1], heads // k.shape[1]
    s, q_block, kv_block = config.stride, config.q_block, config.kv_block
    num_q, num_kv = math.ceil(seq_len / q_block), math.ceil(seq_len / kv_block)
    padded = max(num_q * q_block, num_kv * kv_block)
    num_strided = padded // s
    order = strided_order(s, num_strided, q.device)
    rows = torch.arange(num_strided, device=q.device)[:, None] * s + order  # [M, s] q rows
    real = rows < seq_len
    causal = order >= torch.arange(s, device=q.device)  # cell (m, m): key m*s+a <= its row
    # "mean" (XAttention): the mean, not the sum, of the s logits. A sum would add the s-1
    # unrelated logits' noise (spread ~sqrt(s) times one logit's) into the exponent and sharpen
    # every uniform cell by s; the mean keeps attention's temperature (exp of it is the cells'
    # geometric mean), but damps one heavy key by s. "max" takes the largest of the s logits:
    # exp of it is within a factor s of the antidiagonal's mass, whatever its spread (§9).
    cell_max = config.cell_score == "max"
    count = real.sum(-1)
    # "mean": cell (m, m) keeps only its causal cells: its logit is rescaled from `count` cells
    # to its own count, and is -inf where it has none.
    diag_count = (real & causal).sum(-1)
    diag_rescale = count / diag_count.clamp(min=1)
    # Q' carries scale (/ count for the mean) per cell and 0 past S (one O(S·D) pass over a
    # gathered copy of q), so the logits need no further pass.
    # ("max" scales its fp32 logits instead: see _cell_max_logits.)
    row_scale = 1.0 if cell_max else scale / count.clamp(min=1)[:, None]
    cell_scale = torch.where(real, row_scale, 0.0).to(q.dtype)
    per_q, per_kv = q_block // s, kv_block // s
    first_q, end_q = (0, num_q) if q_blocks is None else q_blocks
    # q_cells and q_strided hold strided rows lo.. only (indexed m - lo below).
    lo, hi = first_q * per_q, end_q * per_q
    q_rows = rows[lo:hi].clamp(max=seq_len - 1).flatten() - q_row0
    q_cells = q[:, :, q_rows].unflatten(2, (hi - lo, s))
    q_cells = q_cells.mul_(cell_scale[lo:hi, :, None]).unflatten(1, (kv_heads, group))
    k_cells = F.pad(k, (0, 0, 0, padded - seq_len)).unflatten(2, (num_strided, s))
    q_strided, k_strided = q_cells.flatten(-2), k_cells.flatten(-2)

    real_strided = math.ceil(seq_len / s)  # strided rows from here on hold no real row
    est = torch.zeros(batch, heads, end_q - first_q, num_kv, device=q.device)
    peak = torch.zeros_like(est)
    # "max" holds a running maximum and one segment's logits: two logits tensors.
    row_elements = batch * heads * per_q * num_strided * (2 if cell_max else 1)
    blocks = max(1, chunk_elements // max(1, row_elements))
    for first in range(first_q, end_q, blocks):
        last = min(end_q, first + blocks)
        m0, m1 = first * per_q, last * per_q
        keys = min(-(-m1 // per_kv) * per_kv, num_strided)  # whole key blocks up to the chunk
        if cell_max:
            logits = _cell_max_logits(q_cells, k_cells, real, causal, m0, m1, keys, scale, lo)
        else:
            # The group folded into the rows: one [group*rows, s*D] x [s*D, keys] matmul per
            # KV head (a broadcast k would be copied per query head by matmul).
            chunk = q_strided[:, :, :, m0 - lo : m1 - lo].flatten(2, 3)
            logits = (chunk @ k_strided[:, :, :keys].transpose(-1, -2)).unflatten(2, (group, -1))
            logits[..., m0:].masked_fill_(_future(m0, m1, keys, q.device), float("-inf"))
            cells = q_cells[:, :, :, m0 - lo : m1 - lo].float() * k_cells[:, :, None, m0:m1].float()
            on_diag = torch.where(causal[m0:m1], cells.sum(-1), 0.0).sum(-1)
            on_diag = (on_diag * diag_rescale[m0:m1]).masked_fill(
                diag_count[m0:m1] == 0, float("-inf")
            )
            logits[..., m0:].diagonal(dim1=-2, dim2=-1).copy_(on_diag)
        probs = torch.softmax(logits, -1, dtype=torch.float32)
        if m0 == 0:  # strided row 0 has no scored cell if S <= s/2: it weighs nothing
            probs[..., 0, :].nan_to_num_(0.0)
        if m1 > real_strided:  # rows past S: their (uniform) softmax weighs nothing
            probs[..., max(0, real_strided - m0) :, :] = 0
        # [B, Hkv, group, chunk blocks, strided rows per block, key blocks]
        row_mass = probs.unflatten(-2, (last - first, per_q)).unflatten(-1, (-1, per_kv)).sum(-1)
        width = min(num_kv, row_mass.shape[-1])
        out = slice(first - first_q, last - first_q)
        est[:, :, out, :width] = row_mass.sum(-2).flatten(1, 2)[..., :width]
        peak[:, :, out, :width] = row_mass.amax(-2).flatten(1, 2)[..., :width]
    return BlockEstimate(est, peak)


def _cell_max_logits(
    q_cells: torch.Tensor,
    k_cells: torch.Tensor,
    real: torch.Tensor,
    causal: torch.Tensor,
    m0: int,
    m1: int,
    keys: int,
    scale: float,
    lo: int = 0,
) -> torch.Tensor:
    """`cell_score="max"` logits of strided rows m0..m1 against strided keys < keys:
    `[B, Hkv, group, m1 - m0, keys]` fp32, the largest of each cell's real causal antidiagonal
    logits times `scale` (-inf where none). q_cells `[B, Hkv, group, M, s, D]` (0 past S),
    k_cells `[B, Hkv, M, s, D]`, real / causal `[M, s]` as in `torch_antidiagonal_scores`; q_cells
    holds strided rows `lo` on."""
    group = q_cells.shape[2]
    future = _future(m0, m1, keys, q_cells.device)
    best = None
    for a in range(q_cells.shape[-2]):
        # fp32 operands: a bf16 matmul would round each whole logit (the mean's are 1/s of
        # one), and the kernel keeps them in fp32; near-ties of the selection then flip between
        # this path (traced code) and the kernel (eager) on the same inputs.
        rows = q_cells[:, :, :, m0 - lo : m1 - lo, a].flatten(2, 3).float()
        keys_t = k_cells[:, :, :keys, a].float().transpose(-1, -2)
        logits = (rows @ keys_t).unflatten(2, (group, -1)).mul_(scale)
        logits = logits.masked_fill_(~real[m0:m1, a, None], float("-inf"))
        logits[..., m0:].masked_fill_(future, float("-inf"))
        logits[..., m0:].diagonal(dim1=-2, dim2=-1).masked_fill_(~causal[m0:m1, a], float("-inf"))
        best = logits if best is None else torch.maximum(best, logits, out=best)
    return best


def _future(m0: int, m1: int, keys: int, device: torch.device) -> torch.Tensor:
    """`[m1 - m0, keys - m0]` bool: strided key m0 + j lies after strided row m0 + i."""
    return torch.arange(m0, keys, device=device) > torch.arange(m0, m1, device=device)[:, None]


def select_blocks(
    estimate: BlockEstimate, seq_len: int, config: SampleConfig, first_block: int = 0
) -> torch.Tensor:
    """Kept blocks `[B, H, nQ, nKV]` (bool) from the estimate (`[B, H, nQ, nKV]` tensors) of the
    query blocks `first_block`, `first_block + 1`, ... (0: all of them), per query block:
    the diagonal blocks (those meeting the block's rows), the `local_blocks` before them, key
    block 0 (the sink), every causal block where the query block holds one of the last
    `dense_tail` rows and, with `row_threshold`, every causal block whose `peak` reaches
    `config.peak_bar(seq_len)`; then the fewest other causal blocks by descending `mass` (ties:
    lower index first) until the kept mass reaches `alpha` of the row's; alpha = 1 (or a row
    with no estimate) keeps every causal block. Sums are exact: the mass is counted in
    `estimate_units`."""
    est = estimate.mass
    causal, forced = _causal_and_forced(
        est.shape[-2], est.shape[-1], seq_len, config, est.device, first_block
    )
    if config.alpha >= 1.0:
        return causal.expand(est.shape).clone()
    bar = config.peak_bar(seq_len)
    if bar is not None:
        forced = forced | (causal & (estimate.peak.double() >= bar))
    units = estimate_units(torch.where(causal, est, 0.0))
    total = units.sum(-1)
    covered = torch.where(forced, units, 0).sum(-1)
    bar = torch.where(total > 0, config.alpha * total.double(), math.inf)[..., None]
    chosen = shortest_prefix(torch.where(forced, 0, units), covered, bar)
    return (chosen | forced) & causal


def estimate_units(mass: torch.Tensor) -> torch.Tensor:
    """Non-negative estimate `[..., n]`, taken as float32 (what `antidiagonal_scores` returns;
    the kernel reads float32) -> int64 units of 2^-UNIT_BITS of the row's top power of two
    (2^e in (largest, 2 * largest]): the selection's sums are then exact integers, the same in
    every order of addition (the Triton kernel's bisection and this path's sorted cumsum), and
    blocks below 2^-31 of the row's largest may count as nothing. Every float32 is a normal
    float64, so the exponent bits and the power-of-two scale below are exact."""
    mass = mass.float().double()
    top = mass.amax(-1, keepdim=True)
    # frexp's exponent from the bits, and 2^(UNIT_BITS - e) built from bits: exact.
    exp = torch.where(top > 0, (top.view(torch.int64) >> 52 & 0x7FF) - 1022, 0)
    scale = ((1023 + UNIT_BITS - exp) << 52).view(torch.float64)
    return (mass * scale).long()


def selected_lists(
    estimate: BlockEstimate,
    seq_len: int,
    config: SampleConfig,
    first_block: int = 0,
    heads: int | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(keep `[B, H, nQ, nKV]` bool, the four BlockMask lists) of `select_blocks`: one Triton
    launch where `layout.use_kernels` (`kernels/select_lists.py`), else `select_blocks` and
    `block_mask.keep_lists`. `heads`: the query heads to return (None: the estimate's); an
    estimate of fewer heads (`group_estimate`) has each head's selection repeated for the
    `heads / H` query heads of its group."""
    est = estimate.mass
    keep, lists = None, None
    if use_kernels(config, est.device):
        from flexsample.kernels.select_lists import MAX_KV_BLOCKS, triton_select_lists

        if est.shape[-1] <= MAX_KV_BLOCKS:
            keep, lists = triton_select_lists(estimate, seq_len, config, first_block)
    if keep is None:
        keep = select_blocks(estimate, seq_len, config, first_block)
        first_row = torch.arange(first_block, first_block + est.shape[-2], device=est.device)
        lists = keep_lists(keep, first_row * config.q_block, config.kv_block)
    group = 1 if heads is None else heads // est.shape[1]
    if group == 1:
        return keep, lists
    # An int repeat is expand + copy (no host sync: the build is captured in a CUDA graph).
    return keep.repeat_interleave(group, 1), tuple(x.repeat_interleave(group, 1) for x in lists)


def _causal_and_forced(
    num_q: int,
    num_kv: int,
    seq_len: int,
    config: SampleConfig,
    device: torch.device,
    first_block: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[nQ, nKV]` bool: blocks with a causal pair, and the blocks kept whatever the estimate,
    of the query blocks from `first_block` on."""
    first = torch.arange(first_block, first_block + num_q, device=device)[:, None] * config.q_block
    last = torch.clamp(first + config.q_block, max=seq_len) - 1
    block = torch.arange(num_kv, device=device)
    causal = block <= last // config.kv_block
    local = block >= first // config.kv_block - config.local_blocks
    tail = last >= seq_len - config.dense_tail
    return causal, causal & (local | (block == 0) | tail)
