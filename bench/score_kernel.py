"""Stage-1 score kernel: launch parameters swept on the Llama-3-8B shape, with achieved TFLOP/s.

Work counted: one QK^T pass over the sampled rows, each row against its causal prefix.
Writes bench/results/score_kernel.{md,json}. GPU only: `python -m bench.score_kernel`.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from bench.harness import progress, time_ms, write_results
from flexsample import SampleConfig
from flexsample.kernels import sampling
from flexsample.layout import make_layout
from flexsample.synthetic import structured_qkv

COLUMNS = ["S", "sample_ratio", "split_blocks", "num_warps", "num_stages", "ms", "TFLOP/s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument(
        "--splits",
        type=int,
        nargs="+",
        default=[32, 64, 128, 1024],
        help="KV blocks per program (split_blocks)",
    )
    args = parser.parse_args(argv)
    config = SampleConfig(min_seq_len=0)
    default = {
        "split_blocks": sampling.SPLIT_BLOCKS,
        "num_warps": sampling.NUM_WARPS,
        "num_stages": sampling.NUM_STAGES,
    }
    rows = []
    for seq_len in args.lengths:
        x = structured_qkv(1, 32, 8, seq_len, 128, dtype=torch.bfloat16, device="cuda")
        layout = make_layout(config, seq_len, torch.device("cuda"), kernels=True)
        sampled = layout.rows.flatten().cpu()
        sampled = sampled[sampled >= 0].double()
        flops = 2 * 32 * 128 * (sampled + 1).sum().item()
        for split, warps, stages in itertools.product(args.splits, args.warps, args.stages):
            launch = {"split_blocks": split, "num_warps": warps, "num_stages": stages}
            try:
                ms = time_ms(
                    lambda x=x, launch=launch, layout=layout: sampling.triton_tile_scores(
                        x.q, x.k, layout, 128**-0.5, **launch
                    )
                )
            except Exception as err:  # e.g. out of shared memory for this config
                progress(
                    f"S={seq_len} split={split} warps={warps} stages={stages}: {err}".splitlines()[
                        0
                    ]
                )
                continue
            row = {
                "S": seq_len,
                "sample_ratio": config.sample_ratio,
                "split_blocks": split,
                "num_warps": warps,
                "num_stages": stages,
                "ms": ms,
                "TFLOP/s": flops / ms / 1e9,
            }
            rows.append(row)
            progress(f"S={seq_len} split={split} warps={warps} stages={stages}: {ms:.3f} ms")
    notes = [
        f"Config: {config}.",
        "Inputs: structured_qkv, B=1, Hq=32, Hkv=8, D=128, bf16.",
        f"Default launch at the time of the run: {default}.",
    ]
    path = write_results(
        "score_kernel",
        "Stage-1 score kernel launch sweep",
        [("Launch sweep", COLUMNS, rows)],
        notes,
    )
    print(open(path).read())


if __name__ == "__main__":
    main()
