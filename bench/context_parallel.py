"""Context-parallel attention on several GPUs: flexsample's op vs dense context parallel.

Launch: `torchrun --nproc_per_node 2 -m bench.context_parallel` (one process per GPU, NCCL;
NVLink multicast off: NCCL_NVLS_ENABLE=0 unless set). Llama-3-8B attention shape (B 1, Hq 32,
Hkv 8, D 128, bf16) on `flexsample.synthetic.structured_qkv` inputs, built on every rank from
one seed and zigzag-sharded (`flexsample.distributed.shard_sequence`). Per length:
- "flexsample CP": `context_parallel_sample_attention`, end to end (all-gather K/V, stage 1 on
  the rank's sampled rows, all-reduce, selection, shard mask, flex), and its parts;
- "dense CP cudnn": `context_parallel_dense_attention(kernel="cudnn")`: all-gather K/V, then per
  chunk cuDNN over the causal square and the rectangle of earlier keys, merged by log-sum-exp
  (the kernel of the single-GPU baseline, cuDNN, in the same sharding);
- "dense CP sdpa": the same layout, SDPA per chunk with the causal rule aligned bottom-right
  (FlashAttention 2 in torch's SDPA; cuDNN has no such variant there);
- "dense CP flex": the same layout with flex_attention over every causal block (the kernel the
  sparse path runs).
Times: each op runs the same number of times on every rank (a collective inside forbids
do_bench's adaptive repeat counts), after a warm-up call that compiles; per call the slowest
rank's time (max over ranks), median over calls; "imbalance" = slowest / fastest rank of the
flexsample op. Then, at `--check-len` (fits one GPU), the CP output against single-GPU
`sample_attention` on the whole sequence: whether every rank's mask rows equal the
single-GPU mask's, and the output error. With `--single-len`, rank 0 alone times the single-GPU
op and SDPA cuDNN at that length (the gain that CP is held to), the other ranks waiting. Rank 0
writes bench/results/context_parallel.{md,json}
(`--name`) after every length. CPU smoke run (gloo, small shapes, bench/results/cpu):
`torchrun --nproc_per_node 2 -m bench.context_parallel --cpu-smoke`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.harness import RESULTS, add_config_overrides, progress, write_results
from flexsample import SampleConfig, sample_attention, sample_block_mask
from flexsample import distributed as cp
from flexsample.block_mask import kept_blocks
from flexsample.metrics import _causal_pairs_upto, block_density
from flexsample.synthetic import structured_qkv

COLUMNS = [
    "S",
    "ranks",
    "density",
    "gather ms",
    "mask build ms",
    "sparse attn ms",
    "flexsample CP ms",
    "imbalance",
    "dense CP cudnn ms",
    "dense CP sdpa ms",
    "dense CP flex ms",
    "x vs dense cudnn",
    "x vs dense sdpa",
    "x vs dense flex",
    "peak GiB",
]
CHECK_COLUMNS = ["S", "ranks", "mask rows equal", "max abs err", "rel RMS err", "density"]
SINGLE_COLUMNS = ["S", "density", "flexsample op ms", "SDPA cuDNN ms", "x vs cuDNN"]
#: (Hq, Hkv, D, dtype, device) of the GPU run (Llama-3-8B attention) and of the CPU smoke run.
GPU_SHAPE = (32, 8, 128, torch.bfloat16, "cuda")
CPU_SHAPE = (8, 2, 64, torch.float32, "cpu")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, device: str, *, alone: bool = False) -> tuple[float, float]:
    """(median over calls of the slowest rank's ms, median slowest / fastest rank) of `fn()`,
    called `reps` times on every rank after one warm-up call; `alone`: this rank only, no
    collective (ratio 1)."""
    fn()
    slowest, ratio = [], []
    for _ in range(reps):
        _sync(device)
        if alone:
            start = time.perf_counter()
            fn()
            _sync(device)
            slowest.append((time.perf_counter() - start) * 1000)
            ratio.append(1.0)
            continue
        dist.barrier()
        start = time.perf_counter()
        fn()
        _sync(device)
        ms = torch.tensor([(time.perf_counter() - start) * 1000], device=device)
        spread = torch.cat([ms, -ms])
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        slowest.append(spread[0].item())
        ratio.append(spread[0].item() / -spread[1].item())
    return statistics.median(slowest), statistics.median(ratio)


def inputs(seq_len: int, shape: tuple, seed: int, device: str = "cpu"):
    """The structured inputs of the whole sequence (every rank builds the same from `seed`)."""
    heads, kv_heads, dim, dtype, _ = shape
    return structured_qkv(1, heads, kv_heads, seq_len, dim, seed=seed, dtype=dtype, device=device)


def kept_pairs(keep: torch.Tensor, shard: cp.Shard, q_block: int, kv_block: int) -> float:
    """Causal (query, key) pairs in the kept blocks `[B, H, nQ_local, nKV]` of a shard."""
    opts = {"device": keep.device, "dtype": torch.float64}
    first = shard.q_blocks(keep.device).double()[:, None] * q_block
    last = torch.clamp(first + q_block - 1, max=shard.seq_len - 1)
    key_first = torch.arange(keep.shape[-1], **opts)[None, :] * kv_block
    key_last = torch.clamp(key_first + kv_block - 1, max=shard.seq_len - 1)
    pairs = _causal_pairs_upto(last, key_first, key_last) - _causal_pairs_upto(
        first - 1, key_first, key_last
    )
    return (keep.double() * pairs).sum().item() / (keep.shape[0] * keep.shape[1])


def parts(q, k, v, seq_len: int, config: SampleConfig, shard: cp.Shard, args) -> dict:
    """The flexsample op's parts, each timed alone (their sum exceeds the op by the barriers
    between them), and the mask's density over all ranks."""
    device = args.shape[4]
    kf = cp.gather_sequence(k, None, seq_len, block=config.q_block)
    vf = cp.gather_sequence(v, None, seq_len, block=config.q_block)
    gather, _ = timed(
        lambda: cp.gather_sequence(k, None, seq_len, block=config.q_block), args.reps, device
    )
    mask = cp.context_parallel_block_mask(q, kf, config)
    # Counted before the attention runs: the dense tail's split rewrites its rows in place.
    pairs = kept_pairs(kept_blocks(mask), shard, config.q_block, config.kv_block)
    build, _ = timed(lambda: cp.context_parallel_block_mask(q, kf, config), args.reps, device)
    attn, _ = timed(
        lambda: cp.shard_attention(q, kf, vf, mask, shard, config, split_tail=True),
        args.reps,
        device,
    )
    pairs = torch.tensor([pairs], device=device)
    dist.all_reduce(pairs)
    return {
        "gather ms": 2 * gather,  # K and V
        "mask build ms": build,
        "sparse attn ms": attn,
        "density": pairs.item() / (seq_len * (seq_len + 1) / 2),
    }


def measure(seq_len: int, config: SampleConfig, args, rank: int, world: int) -> dict:
    device = args.shape[4]
    # Built on the host and sharded there: only the shard reaches the GPU.
    x = inputs(seq_len, args.shape, args.seed)
    q, k, v = (
        cp.shard_sequence(t, rank, world, block=config.q_block).to(device) for t in (x.q, x.k, x.v)
    )
    del x
    shard = cp.shard_layout(seq_len, rank, world, config.q_block)
    row = {"S": seq_len, "ranks": world}

    def op():
        return cp.context_parallel_sample_attention(q, k, v, config, seq_len=seq_len)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row["flexsample CP ms"], row["imbalance"] = timed(op, args.reps, device)
    if device == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    progress(f"  flexsample CP {row['flexsample CP ms']:.1f} ms")

    row |= parts(q, k, v, seq_len, config, shard, args)

    for kernel in args.dense_kernels:
        column = f"dense CP {kernel} ms"
        try:
            row[column], _ = timed(
                lambda kernel=kernel: cp.context_parallel_dense_attention(
                    q, k, v, block=config.q_block, seq_len=seq_len, kernel=kernel
                ),
                args.reps,
                device,
            )
            row[f"x vs dense {kernel}"] = row[column] / row["flexsample CP ms"]
            progress(f"  {column} {row[column]:.1f}")
        except (RuntimeError, torch.OutOfMemoryError) as err:
            # Raised on every rank alike (same shapes), so no rank waits in a collective.
            row[column] = f"failed: {str(err).splitlines()[0][:80]}"
            progress(f"  {column} {row[column]}")
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def single_gpu(seq_len: int, config: SampleConfig, args, rank: int) -> dict:
    """Rank 0 alone, on the whole sequence: flexsample's op and SDPA cuDNN (K/V expanded to Hq
    heads, not timed; as bench/dense.py), i.e. the single-GPU gain at `seq_len`."""
    row = {"S": seq_len}
    if rank == 0:
        device = args.shape[4]
        x = inputs(seq_len, args.shape, args.seed, device)
        row["flexsample op ms"], _ = timed(
            lambda: sample_attention(x.q, x.k, x.v, config, enable_gqa=True),
            args.reps,
            device,
            alone=True,
        )
        mask = sample_block_mask(x.q, x.k, config)
        row["density"] = (
            block_density(kept_blocks(mask), seq_len, seq_len, config.q_block, config.kv_block)
            .mean()
            .item()
        )
        del mask
        group = x.q.shape[1] // x.k.shape[1]
        ke, ve = (t.repeat_interleave(group, 1) for t in (x.k, x.v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            row["SDPA cuDNN ms"], _ = timed(
                lambda: F.scaled_dot_product_attention(x.q, ke, ve, is_causal=True),
                args.reps,
                device,
                alone=True,
            )
        row["x vs cuDNN"] = row["SDPA cuDNN ms"] / row["flexsample op ms"]
        progress(f"  single GPU {row}")
        del x, ke, ve
        torch.cuda.empty_cache()
    dist.barrier()
    return row


def check(seq_len: int, config: SampleConfig, args, rank: int, world: int) -> dict:
    """CP output and mask rows against single-GPU sample_attention on the whole sequence."""
    device = args.shape[4]
    x = inputs(seq_len, args.shape, args.seed, device)
    full_out = sample_attention(x.q, x.k, x.v, config, enable_gqa=True)
    full_keep = kept_blocks(sample_block_mask(x.q, x.k, config))
    shard = cp.shard_layout(seq_len, rank, world, config.q_block)
    q, k, v = (cp.shard_sequence(t, rank, world, block=config.q_block) for t in (x.q, x.k, x.v))
    out = cp.context_parallel_sample_attention(q, k, v, config, seq_len=seq_len)
    keep = kept_blocks(cp.context_parallel_block_mask(q, x.k, config))
    expected = cp.shard_sequence(full_out, rank, world, block=config.q_block)
    diff = (out.float() - expected.float()).flatten()
    differs = not torch.equal(keep, full_keep[:, :, shard.q_blocks(keep.device)])
    maxima = torch.tensor([float(differs), diff.abs().max().item()], device=device)
    sums = torch.tensor([diff.square().sum().item(), expected.float().square().sum().item()])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    dist.all_reduce(sums := sums.to(device))
    density = block_density(full_keep, seq_len, seq_len, config.q_block, config.kv_block)
    return {
        "S": seq_len,
        "ranks": world,
        "mask rows equal": maxima[0].item() == 0,
        "max abs err": maxima[1].item(),
        "rel RMS err": (sums[0] / sums[1]).sqrt().item(),
        "density": density.mean().item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288, 1048576])
    parser.add_argument("--check-len", type=int, default=131072, help="0 skips the check")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    # Over the package's default config (min_seq_len 0).
    add_config_overrides(parser, "--set estimator=stripes --set alpha=0.95")
    parser.add_argument(
        "--flex-backend",
        choices=["auto", "triton", "flash"],
        default="auto",
        help="flex_attention's kernel for the sparse path (SampleConfig.flex_backend)",
    )
    parser.add_argument(
        "--dense-kernels",
        nargs="+",
        choices=["cudnn", "sdpa", "flex"],
        default=["cudnn", "sdpa", "flex"],
        help="dense CP baselines to time (context_parallel_dense_attention's kernel)",
    )
    parser.add_argument(
        "--single-len", type=int, default=0, help="rank 0 times the single-GPU op (0: skip)"
    )
    parser.add_argument("--name", default="context_parallel")
    parser.add_argument("--cpu-smoke", action="store_true", help="gloo, small shapes, no GPU")
    args = parser.parse_args(argv)

    timeout = datetime.timedelta(minutes=10)
    if args.cpu_smoke:
        args.shape, args.out_dir = CPU_SHAPE, RESULTS / "cpu"
        args.lengths, args.check_len = [2048, 3000], 1000
        dist.init_process_group("gloo", timeout=timeout)
    else:
        args.shape, args.out_dir = GPU_SHAPE, RESULTS
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank:
        global progress
        progress = _quiet  # one rank reports
    base = {"min_seq_len": 0}
    config = SampleConfig(**(base | {"flex_backend": args.flex_backend} | dict(args.set)))
    rows, checks, single = [], [], []
    try:
        if args.check_len:
            progress(f"check at S={args.check_len}")
            checks.append(check(args.check_len, config, args, rank, world))
            progress(f"  {checks[-1]}")
        if args.single_len and not args.cpu_smoke:
            progress(f"single GPU at S={args.single_len}")
            single.append(single_gpu(args.single_len, config, args, rank))
        for seq_len in args.lengths:
            progress(f"S={seq_len}")
            rows.append(measure(seq_len, config, args, rank, world))
            if rank == 0:
                _write(args, config, world, rows, checks, single)
        if rank == 0:
            print(open(_write(args, config, world, rows, checks, single)).read())
    finally:
        dist.destroy_process_group()


def _quiet(message: str) -> None:
    del message


def _write(
    args, config: SampleConfig, world: int, rows: list[dict], checks: list[dict], single: list
):
    heads, kv_heads, dim, dtype, device = args.shape
    backend = dist.get_backend()
    nvls = os.environ.get("NCCL_NVLS_ENABLE", "unset")
    notes = [
        f"{world} ranks ({device}), {backend}"
        + (f", NCCL_NVLS_ENABLE={nvls}. " if backend == "nccl" else ". ")
        + f"Inputs: structured_qkv(seed={args.seed}), B 1, Hq {heads}, Hkv {kv_heads}, D {dim}, "
        f"{dtype}, zigzag-sharded (rank r: chunks r and 2W-1-r of 2W).",
        f"Config: {config}.",
        f"Each op ran {args.reps} times after a warm-up call on every rank; a call's time is the "
        "slowest rank's (host clock after synchronize, calls started together by a barrier); "
        "the table has the median over calls. 'imbalance' = slowest / fastest rank of the "
        "flexsample op. 'peak GiB' = the op's peak allocated memory on rank 0 (inputs included).",
        "Parts of the flexsample op, each timed alone: 'gather ms' (K and V all-gathers), "
        "'mask build ms' (stripes: stage 1 on the rank's sampled rows, all-reduce, selection, "
        "shard block lists; antidiagonal: each chunk's estimate and selection, the shard "
        "BlockMask), 'sparse attn ms' (flex_attention over the shard; on the rank holding the "
        "dense tail, its rows split apart as single-GPU flexsample runs them, flexsample/tail.py).",
        "'x vs dense ...' = dense CP time / flexsample CP time, all end to end with the "
        "all-gathers (the flexsample op's V gather overlaps its mask build). Dense CP cudnn: "
        "per chunk cuDNN over the causal square and over the rectangle of earlier keys "
        "(K/V expanded to Hq heads, timed), merged by log-sum-exp. Dense CP sdpa: "
        "FlashAttention via causal_lower_right per chunk. Dense CP flex: flex_attention with "
        "every causal block, same layout (FLASH backend where it can run).",
        "Single GPU table (rank 0 alone, whole sequence, same inputs and config): "
        "sample_attention end to end and SDPA cuDNN on K/V expanded to Hq heads (not timed), "
        "timed like the CP ops (warm-up, then the median of the calls).",
        "density: kept causal pairs over all ranks / (S(S+1)/2), per head, averaged.",
        "Check table: CP vs single-GPU sample_attention on the whole sequence (same config): "
        "'mask rows equal' is true when every rank's kept blocks equal the single-GPU mask's "
        "rows; errors are over all ranks' outputs, in the inputs' dtype.",
    ]
    tables = [("Context parallel attention", COLUMNS, rows)]
    if single:
        tables.append(("Single GPU (rank 0 alone)", SINGLE_COLUMNS, single))
    if checks:
        tables.append(("Equality with single-GPU flexsample", CHECK_COLUMNS, checks))
    return write_results(args.name, "Context-parallel attention", tables, notes, args.out_dir)


if __name__ == "__main__":
    main()
