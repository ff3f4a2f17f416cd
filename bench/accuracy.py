"""Coverage and output error of flexsample vs simpler sparse patterns at equal density.

For each length and config, per method: density (kept share of the causal area), true CRA
(share of each row's full attention mass kept; mean over rows, then over heads; the worst
head; the 1st percentile over rows), and the output's relative error vs dense attention
(max and mean over heads). Methods: flexsample at each alpha and sample ratio; at each
alpha's per-head density, window + sink, the exact-column-mass oracle and MInference's
vertical-slash estimate (`flexsample.baselines`). Inputs: `flexsample.synthetic.structured_qkv`,
or with `--qkv PATH` a real model's captured q/k/v (one input per saved layer; written by
`python -m bench.realtext`, results `accuracy_qkv`).
Writes bench/results/accuracy.{md,json} (CPU: bench/results/cpu/); `bench.plot` draws it.

GPU: `python -m bench.accuracy`; CPU (S <= 8K): `python -m bench.accuracy --cpu-smoke`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types

import torch
import torch.nn.functional as F

from bench.harness import RESULTS, progress, write_results
from flexsample import SampleConfig, sample_block_mask
from flexsample.attention import attention_with_mask
from flexsample.baselines import oracle_columns, vertical_slash, window_sink
from flexsample.block_mask import keep_block_mask, kept_blocks
from flexsample.metrics import block_density, column_mass, density, true_cra
from flexsample.synthetic import structured_qkv

COLUMNS = [
    "input",
    "S",
    "alpha",
    "sample_ratio",
    "method",
    "density",
    "CRA mean",
    "CRA worst head",
    "CRA p1",
    "err max",
    "err mean",
]


def evaluate(x, keep: torch.Tensor, dense: torch.Tensor, config: SampleConfig, rows) -> dict:
    """Density, true CRA and output error of a block keep matrix on inputs x."""
    seq_len = x.q.shape[2]
    cra = true_cra(x.q, x.k, keep, config, rows=rows)
    out = attention_with_mask(
        x.q, x.k, x.v, keep_block_mask(keep, seq_len, config), enable_gqa=True
    )
    err = (out - dense).float().norm(dim=(-1, -2)) / dense.float().norm(dim=(-1, -2))
    dens = block_density(keep, seq_len, seq_len, config.q_block, config.kv_block)
    return {
        "density": dens.mean().item(),
        "CRA mean": cra.mean().item(),
        "CRA worst head": cra.mean(-1).min().item(),
        "CRA p1": cra.flatten().float().quantile(0.01).item(),
        "err max": err.max().item(),
        "err mean": err.mean().item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.98])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.005, 0.02])
    parser.add_argument(
        "--all-rows-upto",
        type=int,
        default=32768,
        help="true CRA over every row up to this S, else 4096 evenly spaced rows",
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="S <= 8K on the CPU")
    parser.add_argument(
        "--qkv",
        default=None,
        help="captured q/k/v file (bench.realtext) instead of synthetic inputs",
    )
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        lengths = [length for length in args.lengths if length <= 8192] or [2048, 4096]
        shape, dtype, device, out_dir = (8, 2, 64), torch.float32, "cpu", RESULTS / "cpu"
        base = SampleConfig(estimator="stripes", min_seq_len=0, q_block=64, kv_block=64)
    else:
        shape, dtype, device, out_dir = (32, 8, 128), torch.bfloat16, "cuda", RESULTS
        lengths, base = args.lengths, SampleConfig(estimator="stripes", min_seq_len=0)
    heads, kv_heads, dim = shape
    name, source = "accuracy", "structured"
    if args.qkv:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        captured = torch.load(args.qkv)
        name, source = "accuracy_qkv", f"{args.qkv} ({captured.get('source', '?')})"
        out_dir = RESULTS if device == "cuda" else RESULTS / "cpu"
        inputs = [
            (f"layer {layer}", captured["q"][i].shape[2], _captured(captured, i, device))
            for i, layer in enumerate(captured["layers"])
        ]
        heads, kv_heads, dim = (
            inputs[0][2].q.shape[1],
            inputs[0][2].k.shape[1],
            inputs[0][2].q.shape[3],
        )
        dtype = inputs[0][2].q.dtype
    else:
        inputs = ((f"structured S={n}", n, None) for n in lengths)
    rows_out = []

    def record(label, seq_len, alpha, ratio, method, values):
        row = {
            "input": label,
            "S": seq_len,
            "alpha": alpha,
            "sample_ratio": ratio,
            "method": method,
            **values,
        }
        rows_out.append(row)
        progress(
            f"  {method:<16} alpha={alpha} ratio={ratio}: density={row['density']:.3f} "
            f"CRA={row['CRA mean']:.4f} worst={row['CRA worst head']:.4f} "
            f"err={row['err mean']:.4f}"
        )

    def write(rows: list[dict]):
        notes = [
            f"Inputs: flexsample.synthetic.structured_qkv(seed=0), B=1, Hq={heads}, "
            f"Hkv={kv_heads}, D={dim}, {dtype}; head kinds local/stripe/diffuse in turn."
            if source == "structured"
            else f"Inputs: captured q/k/v {source}, Hq={heads}, Hkv={kv_heads}, "
            f"D={dim}, {dtype}, one input per layer.",
            f"Base config: {base}; rows vary alpha and sample_ratio.",
            "Baselines are matched per head to flexsample's density at the default sample ratio "
            "(the smallest mask of their pattern at or above it, so their density is never "
            "lower); every method keeps the diagonal blocks.",
            "CRA: true CRA of ALGORITHM §6 (share of a row's full causal attention mass kept), "
            "mean "
            f"over rows then heads; over every row for S <= {args.all_rows_upto}, else over 4096 "
            "evenly spaced rows. 'CRA p1' is the 1st percentile over all (head, row) pairs.",
            "err: ||out - dense|| / ||dense|| per head (dense = SDPA is_causal, same dtype), max "
            "and mean over heads.",
        ]
        return write_results(
            name, "Accuracy at equal density", [("Accuracy", COLUMNS, rows)], notes, out_dir
        )

    for label, seq_len, x in inputs:
        progress(f"{label}: inputs, dense attention, exact column mass")
        if x is None:
            x = structured_qkv(1, heads, kv_heads, seq_len, dim, dtype=dtype, device=device)
        dense = F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, enable_gqa=True)
        rows = None
        if seq_len > args.all_rows_upto:
            rows = torch.linspace(0, seq_len - 1, 4096, device=device).long()
        mass = column_mass(x.q, x.k, base)
        for alpha in args.alphas:
            for ratio in sorted({base.sample_ratio, *args.ratios}):
                config = dataclasses.replace(base, alpha=alpha, sample_ratio=ratio)
                block_mask = sample_block_mask(x.q, x.k, config)
                keep = kept_blocks(block_mask)
                record(
                    label,
                    seq_len,
                    alpha,
                    ratio,
                    "flexsample",
                    evaluate(x, keep, dense, config, rows),
                )
                if ratio != base.sample_ratio:
                    continue
                target = density(block_mask)
                baselines = {
                    "window+sink": window_sink(target, seq_len, config),
                    "oracle columns": oracle_columns(x.q, x.k, target, config, mass=mass),
                    "vertical-slash": vertical_slash(x.q, x.k, target, config),
                }
                for method, keep in baselines.items():
                    record(
                        label, seq_len, alpha, ratio, method, evaluate(x, keep, dense, config, rows)
                    )
        write(rows_out)  # after every length, so a stopped run keeps what it measured
        del x, dense, mass
        if device == "cuda":
            torch.cuda.empty_cache()

    path = write(rows_out)
    print(open(path).read())


def _captured(captured: dict, index: int, device: str) -> types.SimpleNamespace:
    """Layer `index` of a bench.realtext q/k/v file on `device` (float32 on CPU: no bf16 SDPA
    there worth timing, and the masks are computed in float32 anyway)."""
    x = {name: captured[name][index].to(device) for name in "qkv"}
    if device == "cpu":
        x = {name: t.float() for name, t in x.items()}
    return types.SimpleNamespace(**x)


if __name__ == "__main__":
    main()
