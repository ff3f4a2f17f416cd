"""`SampleConfig`: the knobs of SampleAttention, their defaults, and their validation.

The derived layouts (window width, sampled rows) live here too, because they are the exact
meaning of the fields and every path (reference, PyTorch scores, Triton kernel) must agree.
"""

from __future__ import annotations

import dataclasses
import math

import torch

_BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024)
_SCORE_BACKENDS = ("auto", "torch", "triton")
_FLEX_BACKENDS = ("auto", "triton", "flash")
_ESTIMATORS = ("antidiagonal", "stripes")
_CELL_SCORES = ("max", "mean")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Configuration of SampleAttention (ALGORITHM §2-§4), or of the antidiagonal estimator
    (ALGORITHM §9).

    alpha: CRA threshold; the kept share of the estimated attention mass, in (0, 1]. 0.9,
        chosen with the default estimator (below). SampleAttention's paper uses 0.95, which is
        what the stripes estimator was measured at: pass alpha=0.95 with estimator="stripes".
    window_ratio: local window as a fraction of the sequence length, in [0, 1]. Paper: 8%.
    sample_ratio: share of query rows sampled in stage 1, in (0, 1]. 1%: on the H100 the
        mask build is 5.1% of the sparse attention at 128K and 6.6% at 64K (0.5%: 3.0% and
        6.2%; 2%: 9.7% and 10.8%), with the same true CRA on structured inputs from 0.5% to
        2% (bench/results/mask_build.md, sample-ratio table).
    min_sample_rows: lower bound on the number of sampled rows (short sequences).
    sample_block: rows per contiguous sampled tile; 1 gives evenly strided rows.
    q_block, kv_block: block sizes of the mask (FlexAttention's BLOCK_SIZE).
    min_seq_len: sequences shorter than this run dense SDPA (sparsity does not pay there).
        8192: the default (antidiagonal) config's total (mask build + attention) against
        cuDNN on the H100 is 1.79x / 2.07x at 8K (density 0.127, build 0.22 ms), 2.65x /
        3.48x at 12K and 3.29x / 4.27x at 16K (Triton / FLASH backend, structured inputs;
        bench/results/attention_short.md, 2026-11-26 16:15), so sparsity pays from the
        shortest measured length on both backends. Shorter lengths were not measured. (The
        stripes estimator lost below 12K: 0.64x / 0.70x at 8K in the same run.) That run
        predates the row peaks and `dense_tail`. With both, and the op's CUDA-graph replay
        (`graph_max_len`), the op at 8K in transformers' layout (H200, FA4, op_graphs.md)
        takes 0.654 ms of device time against cuDNN's 0.953 on the Llama-3-8B shape (1.46x)
        but 0.312 against 0.222 on the real-text model's 6 query / 2 KV heads (0.71x), and
        without replay 1.39 / 1.56 ms, host-bound: where sparsity pays at 8K depends on the
        model's width, and below 8K was not measured.
    max_stripe_ratio: optional cap on the share of KV blocks kept as stripes (per head), for
        fixed-density benchmarks; None means no cap.
    tile_alpha: None (the paper's selection from the mean over sampled rows), or a CRA
        threshold in (0, 1] that every sampled tile must also reach on its own: the stripes
        are the union of the mean's prefix and each tile's (ALGORITHM §3). Off by default
        until the real-text judge shows a setting that pays (bench/results/realtext.md).
    score_backend: "auto" (Triton on CUDA where Triton is installed, PyTorch elsewhere),
        "torch" or "triton": the path of stage 1 and of the mask's block lists
        (`layout.use_kernels`, the one place this is decided).
    flex_backend: "auto", "triton" or "flash": flex_attention's kernel on CUDA. "auto" picks
        FLASH (FlashAttention-4, the `fa4` extra) where it is importable and the GPU, dtype,
        head dims and blocks suit it, else Triton; "flash" raises where it cannot run
        (flexsample/flex_backend.py).
    estimator: how the block mask is chosen. "antidiagonal" (default): every query block
        ranks its own key blocks by a strided antidiagonal estimate of the attention mass
        (XAttention-style, scored by `cell_score`) and keeps the fewest whose estimate reaches
        `alpha` of the row's, plus the diagonal, the first key block and `local_blocks` (§9).
        It reads `alpha`, `stride`, `cell_score`, `local_blocks`, `row_threshold`, the block
        sizes and `min_seq_len`; the window and sampling fields do not apply, and `tile_alpha` /
        `max_stripe_ratio` must stay None. "stripes": SampleAttention as published, a window
        of `window_ratio` plus one set of column stripes per head from the sampled rows
        (§2-§4). Why the default changed (H100, 2026-11-26): on the real-text model
        (bench/results/realtext.md) the default (max, stride 16, alpha 0.9) is lossless,
        perplexity ratio 0.999 +- 0.004 at density 0.131, where stripes at alpha 0.95 cost
        +4% at 0.358 and the block oracle needs 0.2 to be within 1%; needle in a haystack
        (niah.md) 0.92 / 0.94 / 1 / 1 at 4K-16K against dense 0.94 / 0.96 / 1 / 1 (one prompt
        of 50 at 4K and at 8K, which run dense below min_seq_len anyway); on the structured
        inputs at 128K (H100, FA4) the op's total was 24.3 ms, 10.3x cuDNN (stripes at
        alpha 0.95: 7.1x in an earlier run); the estimate kernel is 16.8 ms of it. With
        `row_threshold` (below) 26.6 ms, 9.28x (attention_before_tail.md); with `dense_tail`
        too 28.9 ms, 8.74x (attention.md).
    stride: antidiagonal stride s: each s x s cell of the attention matrix is scored by one
        antidiagonal (s query rows against s keys), so scoring costs ~1/s of attention's QK^T.
        A power of two dividing q_block and kv_block. 16: at 128K the estimate kernel takes
        16.8 ms against 30.5 ms at stride 8 (antidiagonal_kernel.md, H100), and the real-text
        model is as lossless (ratio 0.999 at density 0.131; stride 8: 0.99 at 0.145).
    cell_score: antidiagonal mode: how one s x s cell is scored from its antidiagonal (§9).
        "max": the largest of the antidiagonal's s logits (s dot products of length D instead
        of one of length s*D: the same FLOPs), so a heavy key keeps its whole logit. "mean":
        the mean logit (XAttention), which divides a heavy key's logit by s. On the structured
        inputs (4K, 8 heads, blocks of 64, alpha 0.95) true CRA mean 0.98 and row p1 0.86 with
        "max" (density 0.16), 0.76 and 0.004 with "mean" (0.13); the sum of the s exps, an
        unbiased sample of the cell's mass, gave 0.98 / 0.87 for s times the exps.
    local_blocks: antidiagonal mode: key blocks kept before each query block's diagonal block
        regardless of the estimate (a local core), an integer >= 0. 1 is a guess (rows at the
        start of a block find their nearest keys in the block before), not swept.
    row_threshold: antidiagonal mode: None, or c > 0: a key block is also kept (and counts
        towards alpha) where one strided row of the query block puts at least c times a uniform
        key block's share, c * kv_block / S, of its own estimated mass (`peak_bar`; ALGORITHM
        §9). The block-level mass sums the query block's strided rows (8 at the defaults), so
        a key block that one row needs (a stripe that row's noise lifts, a band the max-cell
        score underrates) weighs an eighth of that row's share against the alpha cut; the
        peak reads each row alone, at the cost of one more reduction. 7.5: on the structured
        inputs (CPU, fp32, 8 query / 2 KV heads, D 128, alpha 0.9) row 1st-percentile CRA at
        128K 0.690 -> 0.895 (density 0.026 -> 0.036; the rule without it needs density 0.10
        for 0.85), at 32K 0.671 -> 0.877, at 16K 0.750 -> 0.876; c from 5 to 10 within
        ~0.01, 15 loses ~0.05 at 128K. On the H100 at the Llama-3-8B shape (32 heads,
        bench/results/mask_build.md): 128K row p1 0.697 -> 0.896 at density 0.028 -> 0.037,
        op total 9.84x -> 9.28x cuDNN (attention_before_tail.md); real text
        (realtext_rows.md): ratio 1.00 at density 0.132 -> 0.138, and at alpha 0.8 1.02 ->
        1.01.
    dense_tail: antidiagonal mode: an integer >= 0; every query block holding one of the
        last `dense_tail` rows keeps all its causal key blocks (0: none). The first generated
        token reads the last row, and a row that copies one token from far back (a needle, an
        earlier occurrence) is what the strided estimate sees worst: its antidiagonals meet
        that key in one cell of s. The cost is the query block rows that hold those rows
        (one or two at the defaults: two when S mod q_block is 1..63), each at most 2/nQ of
        the causal area; but such a row is one program's serial work, so the sparse kernel's
        time grows by about nQ blocks' time. 64 (the last-64-queries window of MInference's
        estimate): needle in a haystack on the retrieval model (H100, 50 prompts per
        length, bench/results/niah_tail.md) 1 / 1 / 1 / 1 at 4K / 8K / 12K / 16K, equal to
        dense, at density 0.397 / 0.268 / 0.218 / 0.193,
        against 0.96 / 0.96 / 1 / 1 at 0.351 / 0.242 / 0.200 / 0.179 with 0 (niah_tail0.md;
        the misses at depths 0.25-0.5) and window + sink 0.46-0.50. Op total with FA4 on the
        structured inputs (attention.md against attention_before_tail.md, H100): 128K 9.28x ->
        8.74x cuDNN (density 0.0374 -> 0.0393, sparse attention 8.53 -> 10.2 ms), 32K 5.82x
        -> 5.20x.
    split_tail: antidiagonal mode, CUDA: a bool; True runs the dense tail's rows apart from
        the mask's long row (`flexsample/tail.py`): their diagonal square in the main flex
        call, the earlier keys in equal parts as one more flex call, merged by log-sum-exp.
        Same attention, other summation order. In the op's replay at any length, eagerly
        from `tail.EAGER_MIN_BLOCKS` query blocks. H200, Llama-3-8B shape: sparse attention
        at 128K 9.98 -> 9.25 ms on FLASH, 17.4 -> 15.7 on Triton (tail_split_64k.md); the op
        replayed, synced per call, at 32K 3.63 -> 3.35 ms, real-text shape 1.29 -> 0.897
        (op_graphs_tail.md).
    estimate_fp8: antidiagonal mode: a bool; True scores q and k rounded to float8 e4m3, each
        head scaled by a power of two (`flexsample/fp8.py`), on every path; on GPUs with fp8
        tensor cores (sm_89+) the estimate kernel's dots then read e4m3, summed in less than
        fp32 between promotions (`kernels.antidiagonal.FP8_IMPRECISE_ACC`: a relative RMS
        error of 2.2e-3 on the estimate with "max", 3.8e-4 with "mean", H100).
        Memory during the estimate: e4m3 copies of q and k (half their size in bf16), and
        where the kernel cannot read e4m3 their values back in the input dtype. Faster from
        128K only (H100, Llama-3-8B shape: build 15.2 -> 11.3 ms at 128K, attention_fp8.md;
        replayed 1.16 -> 1.14 ms at 32K and slower at 8K-24K, build_floor.md). False (the
        default) until more than one model is judged: see ALGORITHM §9 "fp8 operands".
    group_estimate: antidiagonal mode: a bool; True estimates and selects once per KV head
        instead of once per query head: strided row m of the estimate reads query head
        m mod G of its KV head's group of G (`antidiagonal.group_rows`), so every head of the
        group scores 1/G of the rows, and the group's query heads share one mask. The
        estimate's FLOPs fall G times (4 on Llama-3-8B); the mask covers `alpha` of the
        group's mean estimated mass, and `row_threshold` still reads each strided row alone.
        No effect without GQA (G = 1). False (the default): on the real-text model (H100,
        realtext_group.md) alpha 0.9 gives perplexity ratio 1.02 @ density 0.147 against the
        per-head 1.01 @ 0.143, and the worst head's CRA falls in 3 of 8 layers; it pays where
        the estimate dominates: Llama-3-8B shape at 128K, op total 23.9 -> 16.8 ms (10.5x ->
        14.9x cuDNN, attention_group.md), replayed build at 32K 1.15 -> 0.60 ms
        (build_floor.md). ALGORITHM §9 "Group estimate".
    graph_max_len: prefill tokens per call (batch x length) up to which the op
        (`flexsample::sample_attention`, behind both doors) replays its sparse path as one
        CUDA graph on the device's default stream (`flexsample/graphs.py`), an integer >= 0
        (0: never). Launching the path from Python costs ~1.4 ms of host time a
        call, more than its device time on small models and short prompts; a replay costs
        ~0.16 ms. 32768: on the H200 (bench/results/op_graphs.md, the op in transformers'
        layout, FA4), per call with a device sync after each (as the door's compiled prefill
        runs) replay is 3.6x / 2.0x faster at 8K (real-text model's shape, Hq 6 / Llama-3-8B,
        Hq 32), 2.1x / 1.3x at 16K and 1.4x / 1.0x at 32K (0.995: neutral where the device
        work already hides the host's); the real-text model's prefill
        (ttft_realtext_graphs.md) goes from 0.41x to 1.01x the fastest dense compiled path at
        16K and from 1.04x to 1.48x at 32K (1.04x and 1.68x after the estimate's key splits,
        ttft_realtext_splits.md, another machine and training). Longer prompts were not
        measured: device time there exceeds the launch cost, and each cached length holds its
        own buffers: 96 / 408 MiB at 16K, 168 / 852 MiB at 32K (op_graphs_splits.md).
    """

    alpha: float = 0.9
    window_ratio: float = 0.08
    sample_ratio: float = 0.01
    min_sample_rows: int = 64
    sample_block: int = 16
    q_block: int = 128
    kv_block: int = 128
    min_seq_len: int = 8192
    max_stripe_ratio: float | None = None
    tile_alpha: float | None = None
    score_backend: str = "auto"
    flex_backend: str = "auto"
    estimator: str = "antidiagonal"
    stride: int = 16
    cell_score: str = "max"
    local_blocks: int = 1
    row_threshold: float | None = 7.5
    dense_tail: int = 64
    split_tail: bool = True
    estimate_fp8: bool = False
    group_estimate: bool = False
    graph_max_len: int = 32768

    def __post_init__(self) -> None:
        _check_range("alpha", self.alpha, 0.0, 1.0, low_open=True)
        _check_range("window_ratio", self.window_ratio, 0.0, 1.0)
        _check_range("sample_ratio", self.sample_ratio, 0.0, 1.0, low_open=True)
        _check_int("min_sample_rows", self.min_sample_rows, 1)
        _check_int("sample_block", self.sample_block, 1)
        if self.sample_block > 128:
            raise ValueError(f"sample_block={self.sample_block} is out of range: allowed 1..128")
        for name in ("q_block", "kv_block"):
            value = getattr(self, name)
            # type(...) is int: 128.0 == 128 would pass a membership test, then fail as an index.
            if type(value) is not int or value not in _BLOCK_SIZES:
                raise ValueError(f"{name}={value!r} is not allowed: use one of {_BLOCK_SIZES}")
        _check_int("min_seq_len", self.min_seq_len, 0)
        _check_int("graph_max_len", self.graph_max_len, 0)
        if self.max_stripe_ratio is not None:
            _check_range("max_stripe_ratio", self.max_stripe_ratio, 0.0, 1.0)
        if self.tile_alpha is not None:
            _check_range("tile_alpha", self.tile_alpha, 0.0, 1.0, low_open=True)
        if self.score_backend not in _SCORE_BACKENDS:
            raise ValueError(
                f"score_backend={self.score_backend!r} is not allowed: use one of {_SCORE_BACKENDS}"
            )
        if self.flex_backend not in _FLEX_BACKENDS:
            raise ValueError(
                f"flex_backend={self.flex_backend!r} is not allowed: use one of {_FLEX_BACKENDS}"
            )
        self._check_antidiagonal()

    def _check_antidiagonal(self) -> None:
        if self.estimator not in _ESTIMATORS:
            raise ValueError(
                f"estimator={self.estimator!r} is not allowed: use one of {_ESTIMATORS}"
            )
        block = min(self.q_block, self.kv_block)
        divides = type(self.stride) is int and self.stride >= 1 and block % self.stride == 0
        if not divides or self.stride & (self.stride - 1):
            allowed = [2**i for i in range(block.bit_length())]
            raise ValueError(
                f"stride={self.stride!r} is not allowed: use a power of two dividing "
                f"q_block={self.q_block} and kv_block={self.kv_block}, one of {allowed}"
            )
        _check_int("local_blocks", self.local_blocks, 0)
        _check_int("dense_tail", self.dense_tail, 0)
        for name in ("split_tail", "estimate_fp8", "group_estimate"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not allowed: use True or False"
                )
        value = self.row_threshold
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and math.isfinite(value) and value > 0):
            raise ValueError(
                f"row_threshold={value!r} is not allowed: use None or a finite number > 0"
            )
        if self.cell_score not in _CELL_SCORES:
            raise ValueError(
                f"cell_score={self.cell_score!r} is not allowed: use one of {_CELL_SCORES}"
            )
        if self.estimator == "antidiagonal":
            for name in ("tile_alpha", "max_stripe_ratio"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} is not allowed with "
                        "estimator='antidiagonal' (it selects column stripes): use None"
                    )

    def peak_bar(self, seq_len: int) -> float | None:
        """The `BlockEstimate.peak` at or above which a key block is kept: `row_threshold`
        times a uniform key block's share of a row at the end of the sequence (None: off)."""
        if self.row_threshold is None:
            return None
        return self.row_threshold * self.kv_block / max(seq_len, 1)

    def window_tokens(self, seq_len: int) -> int:
        """Width `w` of the local window in tokens: ceil(window_ratio * S)."""
        return math.ceil(self.window_ratio * seq_len)

    def num_tiles(self, seq_len: int) -> int:
        """Number of sampled tiles: the requested row count rounded up to whole tiles."""
        n = min(max(math.ceil(self.sample_ratio * seq_len), self.min_sample_rows), seq_len)
        return math.ceil(n / self.sample_block)

    def sampled_rows(self, seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Sampled query rows as a padded tile table `[num_tiles, sample_block]` (int32, -1 pads).

        Tile `t` is the tail of the `t`-th of `num_tiles` equal segments of `[0, S)`, clipped to
        its segment, so the last tile ends at row S-1 and tiles never overlap.
        """
        tiles = self.num_tiles(seq_len)
        t = torch.arange(tiles, device=device, dtype=torch.int64)
        end = ((t + 1) * seq_len) // tiles
        start = torch.maximum(end - self.sample_block, (t * seq_len) // tiles)
        rows = end[:, None] - self.sample_block + torch.arange(self.sample_block, device=device)
        return torch.where(rows >= start[:, None], rows, -1).to(torch.int32)

    def window_blocks(
        self, seq_len: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last KV block of each query block's window, `[nQ]` each (int64).

        Query block `qb` keeps every KV block meeting `[first_row(qb) - w, last_row(qb)]`.
        """
        first_row = torch.arange(math.ceil(seq_len / self.q_block), device=device) * self.q_block
        # Divide, then clamp (equal to clamp-then-divide): inductor on CPU (torch 2.13) fails
        # to compile a floor division of a clamped arange.
        lo = torch.div(
            first_row - self.window_tokens(seq_len), self.kv_block, rounding_mode="floor"
        )
        hi = (first_row + self.q_block - 1) // self.kv_block
        return lo.clamp(min=0), hi.clamp(max=(seq_len - 1) // self.kv_block)


def _check_range(
    name: str, value: object, low: float, high: float, *, low_open: bool = False
) -> None:
    bracket = "(" if low_open else "["
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(
            f"{name}={value!r} is not a number: allowed a float in {bracket}{low}, {high}]"
        )
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range: allowed {bracket}{low}, {high}]")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is out of range: allowed an integer >= {low}")


def as_config(config: object) -> SampleConfig:
    """`config`, or the default for None; anything else is a `TypeError` naming what to pass."""
    if config is None:
        return SampleConfig()
    if not isinstance(config, SampleConfig):
        raise TypeError(
            f"config must be a flexsample.SampleConfig or None, got {type(config).__name__} "
            "(build one with SampleConfig(alpha=..., window_ratio=..., ...))"
        )
    return config
