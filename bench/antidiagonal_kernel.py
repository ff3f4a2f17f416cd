"""Antidiagonal estimate kernels: launch parameters swept on the Llama-3-8B shape (or others,
`--heads`), with achieved TFLOP/s, against the chunked PyTorch path.

Work counted: Q'K'^T over the causal strided pairs, 2*s*D FLOPs each (ALGORITHM §9, cost).
Each launch's result is checked against the PyTorch path (relative RMS error, bf16 bound
3e-3). `--splits` sweeps the key splits per row tile (0: `key_splits`' choice, the default).
Writes bench/results/antidiagonal_kernel.{md,json} (`--name`, `--out-dir`). GPU only:
`python -m bench.antidiagonal_kernel`; short lengths: `--lengths 8192 16384 32768 --heads 6/2
32/8 --strides 16 --block-m 128 --block-n 128 --block-k 128 --warps 8 --splits 1 0`.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
from collections.abc import Callable

import torch

from bench.harness import RESULTS, peak_memory_mib, progress, time_ms, write_results
from flexsample import SampleConfig
from flexsample.antidiagonal import CHUNK_ELEMENTS, torch_antidiagonal_scores
from flexsample.kernels import antidiagonal as kernels
from flexsample.synthetic import structured_qkv

COLUMNS = [
    "S",
    "heads",
    "stride",
    "cell_score",
    "path",
    "block_m",
    "block_n",
    "block_k",
    "num_warps",
    "num_stages",
    "splits",
    "ms",
    "TFLOP/s",
    "rel RMS vs torch",
    "peak MiB",
]


def _sweep(
    seq_len: int, heads: str, stride: int, cell_score: str, args: argparse.Namespace
) -> list[dict]:
    """Rows of one (S, heads "Hq/Hkv", stride, cell score): the PyTorch path, then each launch
    of the kernels."""
    q_heads, kv_heads = (int(n) for n in heads.split("/"))
    x = structured_qkv(1, q_heads, kv_heads, seq_len, 128, dtype=torch.bfloat16, device="cuda")
    config = SampleConfig(
        estimator="antidiagonal", stride=stride, cell_score=cell_score, min_seq_len=0
    )
    scale = 128**-0.5
    strided = seq_len / stride
    flops = q_heads * strided * (strided + 1) / 2 * 2 * stride * 128

    def measure(fn: Callable[[], object]) -> dict:
        return {
            "ms": (ms := time_ms(fn)),
            "TFLOP/s": flops / ms / 1e9,
            "peak MiB": peak_memory_mib(fn),
        }

    want = torch_antidiagonal_scores(x.q, x.k, config, scale)
    base = {"S": seq_len, "heads": heads, "stride": stride, "cell_score": cell_score}
    rows = [
        base
        | {"path": "torch"}
        | measure(lambda: torch_antidiagonal_scores(x.q, x.k, config, scale))
    ]
    progress(f"S={seq_len} s={stride} torch: {rows[0]['ms']:.3f} ms")
    for launch in itertools.product(
        args.block_m, args.block_n, args.block_k, args.warps, args.stages, args.splits
    ):
        knobs = dict(zip(COLUMNS[5:11], launch, strict=True))

        def run(knobs=knobs):
            return kernels.triton_antidiagonal_scores(
                x.q, x.k, config, scale, chunk_elements=CHUNK_ELEMENTS, **knobs
            )

        try:
            err = max(_rel_rms(got, ref) for got, ref in zip(run(), want, strict=True))
            row = base | {"path": "triton", **knobs, "rel RMS vs torch": err} | measure(run)
        except Exception as exc:  # e.g. out of shared memory for this launch
            progress(f"S={seq_len} s={stride} {knobs}: {str(exc).splitlines()[0]}")
            continue
        rows.append(row)
        progress(f"S={seq_len} s={stride} {knobs}: {row['ms']:.3f} ms, rel RMS {err:.2e}")
    return rows


def _rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--block-m", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--block-n", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--block-k", type=int, nargs="+", default=[64])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[3])
    parser.add_argument("--cell-scores", nargs="+", choices=["max", "mean"], default=["max"])
    parser.add_argument("--splits", type=int, nargs="+", default=[0])
    parser.add_argument("--heads", nargs="+", default=["32/8"], help="Hq/Hkv shapes")
    parser.add_argument("--name", default="antidiagonal_kernel")
    parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for seq_len, heads, stride, cell in itertools.product(
        args.lengths, args.heads, args.strides, args.cell_scores
    ):
        rows += _sweep(seq_len, heads, stride, cell, args)
        torch.cuda.empty_cache()
    default = {
        "block_m": kernels.BLOCK_M,
        "block_n": kernels.BLOCK_N,
        "block_k": f"{kernels.BLOCK_K} ({kernels.BLOCK_K_SM90} on sm_90+)",
        "num_warps": kernels.NUM_WARPS,
        "num_stages": kernels.NUM_STAGES,
        "splits": f"key_splits (SPLIT_MIN_TILES {kernels.SPLIT_MIN_TILES})",
    }
    notes = [
        "Inputs: structured_qkv, B=1, Hq/Hkv as in 'heads', D=128, bf16; SampleConfig(estimator="
        "'antidiagonal', stride=row's, q_block=kv_block=128).",
        f"Default launch at the time of the run: {default}.",
        "Times are medians of triton.testing.do_bench; 'peak MiB' is the peak allocation above "
        "the inputs (the kernels' scratch is at most CHUNK_ELEMENTS fp32 per launch). "
        "'splits': programs per row tile (0: key_splits' choice for the GPU).",
    ]
    path = write_results(
        args.name,
        "Antidiagonal estimate kernels: launch sweep",
        [("Launch sweep", COLUMNS, rows)],
        notes,
        args.out_dir,
    )
    print(open(path).read())


if __name__ == "__main__":
    main()
