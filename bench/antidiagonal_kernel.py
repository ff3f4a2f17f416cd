"""Antidiagonal estimate kernels: launch parameters swept on the Llama-3-8B shape, with
achieved TFLOP/s, against the chunked PyTorch path.

Work counted: Q'K'^T over the causal strided pairs, 2*s*D FLOPs each (ALGORITHM §9, cost).
Each launch's result is checked against the PyTorch path (relative RMS error, bf16 bound
3e-3). Writes bench/results/antidiagonal_kernel.{md,json}. GPU only:
`python -m bench.antidiagonal_kernel`.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch

from bench.harness import peak_memory_mib, progress, time_ms, write_results
from flexsample import SampleConfig
from flexsample.antidiagonal import CHUNK_ELEMENTS, torch_antidiagonal_scores
from flexsample.kernels import antidiagonal as kernels
from flexsample.synthetic import structured_qkv

COLUMNS = [
    "S",
    "stride",
    "cell_score",
    "path",
    "block_m",
    "block_n",
    "block_k",
    "num_warps",
    "num_stages",
    "ms",
    "TFLOP/s",
    "rel RMS vs torch",
    "peak MiB",
]


def _sweep(seq_len: int, stride: int, cell_score: str, args: argparse.Namespace) -> list[dict]:
    """Rows of one (S, stride, cell score): the PyTorch path, then each launch of the kernels."""
    x = structured_qkv(1, 32, 8, seq_len, 128, dtype=torch.bfloat16, device="cuda")
    config = SampleConfig(
        estimator="antidiagonal", stride=stride, cell_score=cell_score, min_seq_len=0
    )
    scale = 128**-0.5
    strided = seq_len / stride
    flops = 32 * strided * (strided + 1) / 2 * 2 * stride * 128

    def measure(fn: Callable[[], object]) -> dict:
        return {
            "ms": (ms := time_ms(fn)),
            "TFLOP/s": flops / ms / 1e9,
            "peak MiB": peak_memory_mib(fn),
        }

    want = torch_antidiagonal_scores(x.q, x.k, config, scale)
    base = {"S": seq_len, "stride": stride, "cell_score": cell_score}
    rows = [
        base
        | {"path": "torch"}
        | measure(lambda: torch_antidiagonal_scores(x.q, x.k, config, scale))
    ]
    progress(f"S={seq_len} s={stride} torch: {rows[0]['ms']:.3f} ms")
    for launch in itertools.product(
        args.block_m, args.block_n, args.block_k, args.warps, args.stages
    ):
        knobs = dict(zip(COLUMNS[4:9], launch, strict=True))

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
    args = parser.parse_args(argv)
    rows = []
    for seq_len, stride, cell in itertools.product(args.lengths, args.strides, args.cell_scores):
        rows += _sweep(seq_len, stride, cell, args)
        torch.cuda.empty_cache()
    default = {
        "block_m": kernels.BLOCK_M,
        "block_n": kernels.BLOCK_N,
        "block_k": f"{kernels.BLOCK_K} ({kernels.BLOCK_K_SM90} on sm_90+)",
        "num_warps": kernels.NUM_WARPS,
        "num_stages": kernels.NUM_STAGES,
    }
    notes = [
        "Inputs: structured_qkv, B=1, Hq=32, Hkv=8, D=128, bf16; SampleConfig(estimator="
        "'antidiagonal', stride=row's, q_block=kv_block=128).",
        f"Default launch at the time of the run: {default}.",
        "Times are medians of triton.testing.do_bench; 'peak MiB' is the peak allocation above "
        "the inputs (the kernels' scratch is at most CHUNK_ELEMENTS fp32 per launch).",
    ]
    path = write_results(
        "antidiagonal_kernel",
        "Antidiagonal estimate kernels: launch sweep",
        [("Launch sweep", COLUMNS, rows)],
        notes,
    )
    print(open(path).read())


if __name__ == "__main__":
    main()
