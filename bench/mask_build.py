"""Mask-build cost vs sparse attention and dense SDPA, Llama-3-8B attention shape.

For each S: stage-1 scores, selection, BlockMask construction, their total (the mask build,
timed end to end), sparse flex_attention with that mask, build + attention, dense baselines
(SDPA cuDNN and flash on K/V expanded to 32 heads, SDPA default with enable_gqa, dense flex with
full blocks), peak memory of the mask build, density. Then a sample-ratio sweep: overhead vs
true CRA (estimated on 1024 evenly spaced rows). Then the antidiagonal estimator (ALGORITHM §9)
at each `--strides` x `--antidiagonal-alphas` x score backend (the Triton kernels and the
chunked PyTorch path on CUDA): its stages (strided scores, per-block selection, BlockMask), build
vs its own sparse attention, total vs cuDNN, density and true CRA.
Writes bench/results/mask_build.{md,json}.

GPU: `python -m bench.mask_build`; CPU smoke run: `python -m bench.mask_build --cpu-smoke`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch

from bench.dense import dense_baselines
from bench.harness import (
    RESULTS,
    add_antidiagonal_arguments,
    antidiagonal_configs,
    peak_memory_mib,
    progress,
    time_ms,
    write_results,
)
from flexsample import SampleConfig, sample_block_mask
from flexsample.antidiagonal import antidiagonal_scores, selected_lists
from flexsample.attention import attention_with_mask
from flexsample.block_mask import (
    build_block_mask,
    keep_block_mask,
    kept_blocks,
    with_causal_mask_mod,
)
from flexsample.layout import make_layout, use_kernels
from flexsample.metrics import density, true_cra
from flexsample.scores import block_scores
from flexsample.selection import select_stripes
from flexsample.synthetic import structured_qkv

#: The mask build's stages, the build end to end, and the attention under the mask.
BUILD_COLUMNS = [
    "scores ms",
    "select ms",
    "BlockMask ms",
    "mask build ms",
    "sparse attn ms",
    "total ms",
    "build/attn",
    "peak MiB",
    "density",
]
MAIN_COLUMNS = [
    "S",
    "layout ms",
    *BUILD_COLUMNS,
    "SDPA cuDNN ms",
    "SDPA flash ms",
    "SDPA default ms",
    "flex dense ms",
    "x vs cuDNN",
    "x vs flash",
]
SWEEP_COLUMNS = [
    "S",
    "sample_ratio",
    "scores ms",
    "mask build ms",
    "sparse attn ms",
    "build/attn",
    "density",
    "CRA mean",
    "CRA worst head",
    "CRA p1",
]
ANTIDIAGONAL_COLUMNS = [
    "S",
    "config",
    "backend",
    *BUILD_COLUMNS,
    "x vs cuDNN",
    "CRA mean",
    "CRA worst head",
    "CRA p1",
]


def _stages(q, k, config) -> dict:
    """The mask build's stages as thunks, each on the previous stage's result, by column."""
    scale = q.shape[-1] ** -0.5
    seq_len = q.shape[2]
    if config.estimator == "antidiagonal":
        est = antidiagonal_scores(q, k, config, scale)
        heads = q.shape[1]
        keep, lists = selected_lists(est, seq_len, config, heads=heads)
        return {
            "scores ms": lambda: antidiagonal_scores(q, k, config, scale),
            "select ms": lambda: selected_lists(est, seq_len, config, heads=heads),
            "BlockMask ms": lambda: keep_block_mask(
                keep, seq_len, config, compute_q_blocks=False, lists=lists
            ),
        }
    layout = make_layout(config, seq_len, q.device)
    scores, covered = block_scores(q, k, layout, scale)
    stripes = select_stripes(scores, covered, config)
    return {
        "layout ms": lambda: make_layout(config, seq_len, q.device),
        "scores ms": lambda: block_scores(q, k, layout, scale),
        "select ms": lambda: select_stripes(scores, covered, config),
        "BlockMask ms": lambda: build_block_mask(stripes, layout),
    }


def _measure(q, k, v, config, *, with_cra: bool) -> dict[str, float]:
    seq_len = q.shape[2]
    block_mask = sample_block_mask(q, k, config)
    # As sparse_attention runs it: the same lists under a causal mask_mod on CUDA.
    run_mask = with_causal_mask_mod(block_mask) if q.is_cuda else block_mask
    row = {
        **{column: time_ms(fn) for column, fn in _stages(q, k, config).items()},
        "mask build ms": time_ms(lambda: sample_block_mask(q, k, config)),
        "sparse attn ms": time_ms(lambda: attention_with_mask(q, k, v, run_mask, enable_gqa=True)),
        "peak MiB": peak_memory_mib(lambda: sample_block_mask(q, k, config)),
        "density": density(block_mask).mean().item(),
    }
    row["total ms"] = row["mask build ms"] + row["sparse attn ms"]
    row["build/attn"] = row["mask build ms"] / row["sparse attn ms"]
    if with_cra:
        rows = torch.linspace(0, seq_len - 1, min(1024, seq_len), device=q.device).long()
        cra = true_cra(q, k, kept_blocks(block_mask), config, rows=rows)
        row["CRA mean"] = cra.mean().item()
        row["CRA worst head"] = cra.mean(-1).min().item()
        row["CRA p1"] = cra.flatten().quantile(0.01).item()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.04])
    add_antidiagonal_arguments(parser, strides=[8, 16], alphas=[0.9])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run, no GPU needed")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        lengths, shape, dtype, device = [1024], (8, 2, 64), torch.float32, "cpu"
        name, out_dir = "mask_build", RESULTS / "cpu"
        args.ratios = args.ratios[:2]
    else:
        lengths, shape, dtype, device = args.lengths, (32, 8, 128), torch.bfloat16, "cuda"
        name, out_dir = "mask_build", RESULTS
    heads, kv_heads, dim = shape
    base = SampleConfig(estimator="stripes", alpha=0.95, min_seq_len=0)
    main_rows, sweep_rows, antidiagonal_rows = [], [], []
    for seq_len in lengths:
        progress(f"S={seq_len}: inputs")
        x = structured_qkv(1, heads, kv_heads, seq_len, dim, dtype=dtype, device=device)
        row = {"S": seq_len, **_measure(x.q, x.k, x.v, base, with_cra=False)}
        if device == "cuda":
            row.update(dense_baselines(x.q, x.k, x.v, base))
            for col, key in (("x vs cuDNN", "SDPA cuDNN ms"), ("x vs flash", "SDPA flash ms")):
                if key in row:
                    row[col] = row[key] / row["total ms"]
        main_rows.append(row)
        progress("  " + ", ".join(f"{k}={v:.3g}" for k, v in row.items() if isinstance(v, float)))
        for ratio in args.ratios:
            config = dataclasses.replace(base, sample_ratio=ratio)
            sweep = {
                "S": seq_len,
                "sample_ratio": ratio,
                **_measure(x.q, x.k, x.v, config, with_cra=True),
            }
            sweep_rows.append(sweep)
            progress(
                f"  ratio {ratio}: build/attn={sweep['build/attn']:.3f} CRA={sweep['CRA mean']:.4f}"
            )
        backends = ["triton", "torch"] if device == "cuda" else ["torch"]
        for (label, antidiagonal), backend in itertools.product(
            antidiagonal_configs(base, args).items(), backends
        ):
            config = dataclasses.replace(antidiagonal, score_backend=backend)
            measured = {
                "S": seq_len,
                "config": label,
                "backend": backend,
                **_measure(x.q, x.k, x.v, config, with_cra=True),
            }
            if "SDPA cuDNN ms" in row:
                measured["x vs cuDNN"] = row["SDPA cuDNN ms"] / measured["total ms"]
            antidiagonal_rows.append(measured)
            progress(
                f"  {label} {backend}: "
                f"scores={measured['scores ms']:.3g} build={measured['mask build ms']:.3g} "
                f"attn={measured['sparse attn ms']:.3g} density={measured['density']:.3f} "
                f"CRA={measured['CRA mean']:.4f}"
            )
        del x
        if device == "cuda":
            torch.cuda.empty_cache()

    notes = [
        f"Config: {base} (score_backend resolves to "
        f"{'triton' if use_kernels(base, torch.device(device)) else 'torch'}).",
        f"Inputs: flexsample.synthetic.structured_qkv, B=1, Hq={heads}, Hkv={kv_heads}, "
        f"D={dim}, {dtype}.",
        "Times are medians (triton.testing.do_bench on CUDA). 'mask build' is timed end to end "
        "(sample_block_mask); the three columns before it are its parts timed alone.",
        "SDPA cuDNN/flash run on K/V expanded to Hq heads (expansion not timed); 'SDPA default' "
        "uses enable_gqa=True. 'flex dense' is compiled flex_attention with every causal block "
        "(blocks below the diagonal as full blocks).",
        "CRA columns: true CRA of the built mask on 1024 evenly spaced rows (all heads).",
        "Antidiagonal rows: the base config with estimator='antidiagonal' and the row's stride, "
        "alpha and score_backend (ALGORITHM §9); scores = the strided antidiagonal estimate "
        "(triton: flexsample/kernels/antidiagonal.py, what 'auto' runs on CUDA; torch: the "
        "chunked PyTorch path), select = the per-query-block shortest prefix and its block "
        "lists (selected_lists: one launch of flexsample/kernels/select_lists.py on CUDA with "
        "the triton backend), BlockMask = keep_block_mask on those lists; 'x vs cuDNN' = the S "
        "row's SDPA cuDNN time / this row's total.",
    ]
    tables = [
        ("Mask build vs attention", MAIN_COLUMNS, main_rows),
        ("Sample ratio: overhead vs coverage", SWEEP_COLUMNS, sweep_rows),
        ("Antidiagonal estimator: build vs attention", ANTIDIAGONAL_COLUMNS, antidiagonal_rows),
    ]
    path = write_results(name, "flexsample mask build", tables, notes, out_dir)
    print(open(path).read())


if __name__ == "__main__":
    main()
