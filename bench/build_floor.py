"""The mask build's device time at 8K-32K: replayed as a CUDA graph against launched eagerly.

Issue #18 asks for the build's near-fixed floor at short lengths to go. The op replays its
sparse path, build included, as one CUDA graph up to `graph_max_len`, which removes launch
and host costs; what stays is the device time of the estimate and the selection. Per length
and estimate (`--estimates`: bf16, `estimate_fp8`, `group_estimate`): `sample_block_mask` at
the default config,
timed eagerly (`triton.testing.do_bench`: calls back to back, host work hidden unless longer)
and as a replayed CUDA graph (`do_bench_cudagraph`: device time only), and the estimate alone
(`antidiagonal_scores`) replayed. Llama-3-8B and real-text attention shapes, structured
inputs, bf16. Writes bench/results/build_floor.{md,json}. GPU only:
`python -m bench.build_floor`.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import triton.testing

from bench.harness import RESULTS, progress, time_ms, write_results
from flexsample import SampleConfig, sample_block_mask
from flexsample.antidiagonal import antidiagonal_scores
from flexsample.synthetic import structured_qkv

SHAPES = {"Llama-3-8B (Hq 32, Hkv 8)": (32, 8), "real-text model (Hq 6, Hkv 2)": (6, 2)}
#: `--estimates`: the default config's fields each row changes.
ESTIMATES = {
    "bf16": {},
    "fp8": {"estimate_fp8": True},
    "bf16 grp": {"group_estimate": True},
}
COLUMNS = ["S", "shape", "estimate", "eager build ms", "replayed build ms", "replayed estimate ms"]


def _replayed_ms(fn) -> float:
    return float(triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median"))


def _times(q: torch.Tensor, k: torch.Tensor, estimate: str) -> dict:
    config = dataclasses.replace(SampleConfig(min_seq_len=0), **ESTIMATES[estimate])
    return {
        "estimate": estimate,
        "eager build ms": time_ms(lambda: sample_block_mask(q, k, config)),
        "replayed build ms": _replayed_ms(lambda: sample_block_mask(q, k, config)),
        "replayed estimate ms": _replayed_ms(
            lambda: antidiagonal_scores(q, k, config, q.shape[-1] ** -0.5)
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 24576, 32768])
    parser.add_argument("--estimates", nargs="+", choices=list(ESTIMATES), default=list(ESTIMATES))
    parser.add_argument("--name", default="build_floor")
    args = parser.parse_args(argv)
    rows = []
    for shape, (heads, kv_heads) in SHAPES.items():
        for seq_len in args.lengths:
            x = structured_qkv(
                1, heads, kv_heads, seq_len, 128, dtype=torch.bfloat16, device="cuda"
            )
            for estimate in args.estimates:
                rows.append({"S": seq_len, "shape": shape, **_times(x.q, x.k, estimate)})
                progress(str(rows[-1]))
            del x
            torch.cuda.empty_cache()
    notes = [
        f"Config: {SampleConfig(min_seq_len=0)} (default but min_seq_len), and the same with "
        "estimate_fp8=True ('fp8') or group_estimate=True ('grp').",
        "Times are medians: 'eager' of triton.testing.do_bench, 'replayed' of "
        "triton.testing.do_bench_cudagraph (the call captured once, then its graph replayed).",
    ]
    path = write_results(
        args.name,
        "Mask build at 8K-32K: replayed and eager",
        [("Build", COLUMNS, rows)],
        notes,
        RESULTS,
    )
    progress(f"results: {path}")


if __name__ == "__main__":
    main()
