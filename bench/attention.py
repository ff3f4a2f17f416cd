"""The attention op: flexsample (mask build + sparse flex_attention) vs the fastest dense kernels.

Llama-3-8B attention shape (B 1, Hq 32, Hkv 8, D 128, bf16, causal) at S = 8K-128K, on
`flexsample.synthetic.structured_qkv` inputs. Rows: the default config (adaptive density), and
fixed densities of about 5/10/20/40% (alpha = 1 with a window and a stripe cap, so the
density is set by the config, not the input; the measured density is in the row), and the
antidiagonal estimator (ALGORITHM §9) at each `--strides` x `--antidiagonal-alphas`. Columns:
dense baselines (`bench.dense`), mask build, sparse attention, total, density, speedup of the
total vs each baseline, and efficiency = density x dense flex time / sparse time (1 = the
sparse kernel runs the kept blocks as fast as dense flex runs all of them). Column "backend":
flex_attention's kernel for the sparse attention; each row runs under Triton and, where
FlashAttention-4 can run (flexsample/flex_backend.py), again under FLASH, on the same mask.
Writes bench/results/attention.{md,json}; `python -m bench.plot attention` draws it.

GPU: `python -m bench.attention`; CPU smoke run: `python -m bench.attention --cpu-smoke`.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench.dense import dense_baselines
from bench.harness import (
    RESULTS,
    add_antidiagonal_arguments,
    antidiagonal_configs,
    progress,
    time_ms,
    write_results,
)
from flexsample import SampleConfig, sample_block_mask, tail
from flexsample.attention import attention_under_sample_mask
from flexsample.flex_backend import flash_unavailable_reason
from flexsample.metrics import density
from flexsample.synthetic import structured_qkv

COLUMNS = [
    "S",
    "config",
    "backend",
    "density",
    "mask build ms",
    "unsplit attn ms",
    "sparse attn ms",
    "total ms",
    "build share",
    "SDPA cuDNN ms",
    "SDPA flash ms",
    "SDPA default ms",
    "flex dense ms",
    "x vs cuDNN",
    "x vs flash",
    "x vs SDPA default",
    "x vs flex dense",
    "efficiency",
    "eff vs cuDNN",
]
DENSITIES = (0.05, 0.1, 0.2, 0.4)
SPEEDUPS = {
    "x vs cuDNN": "SDPA cuDNN ms",
    "x vs flash": "SDPA flash ms",
    "x vs SDPA default": "SDPA default ms",
    "x vs flex dense": "flex dense ms",
}


def fixed_density(target: float, base: SampleConfig) -> SampleConfig:
    """A stripes config whose mask has about `target` density on any input (alpha = 1 keeps
    every stripe up to the cap): a window of target/5 of S and up to target/2.2 of the blocks."""
    return dataclasses.replace(
        base,
        estimator="stripes",
        alpha=1.0,
        window_ratio=target / 5,
        max_stripe_ratio=target / 2.2,
    )


def measure(
    x, config: SampleConfig, dense: dict[str, float], backends: list[str]
) -> list[dict[str, float]]:
    """One row per flex backend: the mask is built (and its build timed), then run as
    `sparse_attention` runs it (`attention_under_sample_mask`: on CUDA under the causal
    mask_mod, the dense tail's rows split apart where `tail.plan` applies). Where it applies,
    'unsplit attn ms' times the same mask with split_tail=False (before the split rewrites the
    tail rows of that backend's fresh mask)."""
    build = {
        "density": density(sample_block_mask(x.q, x.k, config)).mean().item(),
        "mask build ms": time_ms(lambda: sample_block_mask(x.q, x.k, config)),
    }
    rows = []
    for backend in backends:
        run = dataclasses.replace(config, flex_backend=backend)
        block_mask = sample_block_mask(x.q, x.k, config)
        row = {"backend": backend, **build}
        sms = tail.sm_count(x.q.device.index) if x.q.is_cuda else 0
        if x.q.is_cuda and tail.plan(x.q.shape, run, sms, replayed=False):
            unsplit = dataclasses.replace(run, split_tail=False)
            row["unsplit attn ms"] = time_ms(
                lambda c=unsplit, m=block_mask: attention_under_sample_mask(x.q, x.k, x.v, m, c)
            )
        row["sparse attn ms"] = time_ms(
            lambda c=run, m=block_mask: attention_under_sample_mask(x.q, x.k, x.v, m, c)
        )
        row["total ms"] = row["mask build ms"] + row["sparse attn ms"]
        row["build share"] = row["mask build ms"] / row["total ms"]
        for column, baseline in SPEEDUPS.items():
            if baseline in dense:
                row[column] = dense[baseline] / row["total ms"]
        if "flex dense ms" in dense:
            row["efficiency"] = row["density"] * dense["flex dense ms"] / row["sparse attn ms"]
        if "SDPA cuDNN ms" in dense:
            row["eff vs cuDNN"] = row["density"] * dense["SDPA cuDNN ms"] / row["sparse attn ms"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072]
    )
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    add_antidiagonal_arguments(parser, strides=[8], alphas=[0.9])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run, no GPU needed")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=["triton", "flash"],
        help="default: triton, and flash where it can run",
    )
    parser.add_argument("--name", default="attention")
    parser.add_argument(
        "--eager-split-from",
        type=int,
        help="tail.EAGER_MIN_BLOCKS for this run (measures the eager dense-tail split below it)",
    )
    args = parser.parse_args(argv)
    if args.eager_split_from is not None:
        tail.EAGER_MIN_BLOCKS = args.eager_split_from

    if args.cpu_smoke:
        lengths, shape, dtype, device = [1024], (8, 2, 64), torch.float32, "cpu"
        out_dir = RESULTS / "cpu"
    else:
        lengths, shape, dtype, device = args.lengths, (32, 8, 128), torch.bfloat16, "cuda"
        out_dir = RESULTS
    heads, kv_heads, dim = shape
    base = SampleConfig(min_seq_len=0)
    configs = (
        {
            "default": base,
            "stripes a=0.95": dataclasses.replace(base, estimator="stripes", alpha=0.95),
        }
        | {f"~{round(100 * d)}%": fixed_density(d, base) for d in args.densities}
        | antidiagonal_configs(base, args)
    )
    backends, flash_note = args.backends, None
    if backends is None:
        probe = torch.empty(1, heads, 1, dim, dtype=dtype, device=device)
        flash_note = flash_unavailable_reason(probe, base)
        backends = ["triton"] if flash_note else ["triton", "flash"]
    progress(f"flex backends: {backends}" + (f" (no flash: {flash_note})" if flash_note else ""))
    rows = []
    for seq_len in lengths:
        progress(f"S={seq_len}: inputs and dense baselines")
        x = structured_qkv(1, heads, kv_heads, seq_len, dim, dtype=dtype, device=device)
        dense = dense_baselines(x.q, x.k, x.v, base) if device == "cuda" else {}
        progress("  " + ", ".join(f"{k}={v:.3g}" for k, v in dense.items()))
        for label, config in configs.items():
            for measured in measure(x, config, dense, backends):
                row = {"S": seq_len, "config": label, **dense, **measured}
                rows.append(row)
                progress(
                    f"  {label} {row['backend']}: density={row['density']:.3f} "
                    f"build={row['mask build ms']:.3g} attn={row['sparse attn ms']:.3g} "
                    f"total={row['total ms']:.3g} "
                    f"x cuDNN={row.get('x vs cuDNN', float('nan')):.2f} "
                    f"eff={row.get('efficiency', float('nan')):.2f}"
                )
        del x
        if device == "cuda":
            torch.cuda.empty_cache()

    notes = [
        f"Inputs: flexsample.synthetic.structured_qkv(seed=0), B=1, Hq={heads}, Hkv={kv_heads}, "
        f"D={dim}, {dtype}. Head kinds local/stripe/diffuse in turn: the diffuse third keeps "
        "most blocks at alpha 0.95, which bounds the stripes density (alpha 0.95) from below.",
        f"'default' is {base}; 'stripes a=0.95' is SampleAttention's window and stripes at "
        "alpha 0.95 (the default before the antidiagonal estimator); '~d%' rows are alpha=1, "
        "window_ratio=d/5, "
        "max_stripe_ratio=d/2.2 (density measured, in the row); 'antidiag c a=x s=y r=r' rows "
        "are estimator='antidiagonal', cell_score=c, alpha=x, stride=y, row_threshold=r (and "
        "dense_tail=t where the name ends in t=t; ALGORITHM §9).",
        "Times are medians of triton.testing.do_bench. 'mask build' is sample_block_mask end "
        "to end (scores kernel, selection, BlockMask); 'total' = mask build + sparse attention; "
        "speedups are of the total. 'build share' = mask build / total.",
        "Baselines (bench/dense.py): SDPA cuDNN and flash on K/V expanded to 32 heads, SDPA "
        "default with enable_gqa=True, dense flex = compiled flex_attention over all causal "
        "blocks. efficiency = density x dense flex ms / sparse attn ms; eff vs cuDNN = density "
        "x SDPA cuDNN ms / sparse attn ms (issue #19's measure).",
        "sparse attn ms: the mask run as the op runs it (attention_under_sample_mask), with the "
        "dense tail's rows split apart (flexsample/tail.py) where it applies; 'unsplit attn ms' "
        "the same mask with split_tail=False (tail rows in the mask's flex call).",
        "backend: flex_attention's kernel for the sparse attention, Triton or FLASH "
        "(FlashAttention-4, kernel_options BACKEND='FLASH'); both run the same mask, under the "
        "causal mask_mod that sparse_attention hands the kernel; dense "
        "flex (and so efficiency) is Triton's. "
        + (f"FLASH not run: {flash_note}." if flash_note else f"Ran: {', '.join(backends)}."),
    ]
    path = write_results(
        args.name,
        "flexsample attention vs dense kernels",
        [("Attention op", COLUMNS, rows)],
        notes,
        out_dir,
    )
    print(open(path).read())


if __name__ == "__main__":
    main()
