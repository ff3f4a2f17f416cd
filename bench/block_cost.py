"""Where sparse attention's time goes at low density: cost per kept block and per query-block
row of flex's Triton and FLASH kernels, against cuDNN's dense kernel.

Llama-3-8B attention shape (B 1, Hq 32, Hkv 8, D 128, bf16), random inputs. Each mask keeps a
band of the `k` blocks ending at the diagonal in every query-block row (k = 1: the diagonal
alone), so density is set exactly and every row has the same work. Each runs under two
`mask_mod`s with the same block lists: "sampled" (the BlockMask of `keep_block_mask`, whose
mask_mod reads the keep matrix: what `sample_block_mask` returns) and "causal"
(`with_causal_mask_mod`: what `sparse_attention` hands the kernel). Per backend and mask_mod,
a least-squares fit of time = rows x (fixed cost per row) + kept blocks x (cost per block)
over the k sweep says how many blocks' worth of time each row costs on its own.
Writes bench/results/block_cost.{md,json}.

GPU: `python -m bench.block_cost`; CPU smoke run: `python -m bench.block_cost --cpu-smoke`.
"""

from __future__ import annotations

import argparse

import torch

from bench.dense import dense_baselines
from bench.harness import RESULTS, progress, time_ms, write_results
from flexsample import SampleConfig
from flexsample.attention import attention_with_mask
from flexsample.block_mask import keep_block_mask, with_causal_mask_mod
from flexsample.flex_backend import flash_unavailable_reason

COLUMNS = [
    "S",
    "blocks per row",
    "density",
    "backend",
    "mask_mod",
    "ms",
    "us per kept block",
    "efficiency vs cuDNN",
]
FIT_COLUMNS = [
    "S",
    "backend",
    "mask_mod",
    "us per row",
    "us per block",
    "row cost in blocks",
    "cuDNN us per block",
    "max rel residual",
]


def band_keep(num_blocks: int, width: int, heads: int, device: str) -> torch.Tensor:
    """`[1, heads, n, n]` bool: each query block keeps the `width` blocks ending at its
    diagonal."""
    qb = torch.arange(num_blocks, device=device)[:, None]
    kb = torch.arange(num_blocks, device=device)
    return ((kb <= qb) & (kb > qb - width)).expand(1, heads, -1, -1)


def fit(rows: list[dict], num_rows: int) -> tuple[float, float, float]:
    """Least squares ms = num_rows * a + blocks * b over `rows`: (a, b) in microseconds, and
    the largest relative residual."""
    blocks = torch.tensor([r["kept blocks"] for r in rows], dtype=torch.float64)
    ms = torch.tensor([r["ms"] for r in rows], dtype=torch.float64)
    design = torch.stack([torch.full_like(blocks, float(num_rows)), blocks], 1)
    coef = torch.linalg.lstsq(design, ms[:, None]).solution[:, 0]
    residual = ((design @ coef - ms).abs() / ms).max().item()
    return coef[0].item() * 1e3, coef[1].item() * 1e3, residual


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run, no GPU needed")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        lengths, shape, dtype, device = [512], (4, 2, 32), torch.float32, "cpu"
        args.widths, out_dir = [1, 2], RESULTS / "cpu"
    else:
        lengths, shape, dtype, device = args.lengths, (32, 8, 128), torch.bfloat16, "cuda"
        out_dir = RESULTS
    heads, kv_heads, dim = shape
    config = SampleConfig(min_seq_len=0)
    probe = torch.empty(1, heads, 1, dim, dtype=dtype, device=device)
    backends = {"triton": {"BACKEND": "TRITON"}} if device == "cuda" else {"cpu": None}
    if device == "cuda" and flash_unavailable_reason(probe, config) is None:
        backends["flash"] = {"BACKEND": "FLASH"}
    rows, fits = [], []
    for seq_len in lengths:
        gen = torch.Generator(device=device).manual_seed(seq_len)
        q = torch.randn(1, heads, seq_len, dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(1, kv_heads, seq_len, dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(1, kv_heads, seq_len, dim, device=device, dtype=dtype, generator=gen)
        cudnn = dense_baselines(q, k, v, config).get("SDPA cuDNN ms") if device == "cuda" else None
        num_blocks = -(-seq_len // config.q_block)
        causal_blocks = num_blocks * (num_blocks + 1) // 2
        per_setting: dict[tuple[str, str], list[dict]] = {}
        for width in args.widths:
            if width > num_blocks:
                continue
            keep = band_keep(num_blocks, width, heads, device)
            sampled = keep_block_mask(keep, seq_len, config, compute_q_blocks=False)
            masks = {"sampled": sampled, "causal": with_causal_mask_mod(sampled)}
            kept = int(keep[0, 0].sum())
            for backend, options in backends.items():
                for mask_name, block_mask in masks.items():
                    ms = time_ms(
                        lambda m=block_mask, o=options, x=(q, k, v): attention_with_mask(
                            *x, m, enable_gqa=True, kernel_options=o
                        )
                    )
                    row = {
                        "S": seq_len,
                        "blocks per row": width,
                        "density": kept / causal_blocks,
                        "backend": backend,
                        "mask_mod": mask_name,
                        "ms": ms,
                        "kept blocks": kept * heads,
                        "us per kept block": ms * 1e3 / (kept * heads),
                    }
                    if cudnn is not None:
                        row["efficiency vs cuDNN"] = row["density"] * cudnn / ms
                    rows.append(row)
                    per_setting.setdefault((backend, mask_name), []).append(row)
                    progress(
                        f"S={seq_len} k={width} {backend} {mask_name}: {ms:.3g} ms "
                        f"eff={row.get('efficiency vs cuDNN', float('nan')):.2f}"
                    )
        for (backend, mask_name), setting in per_setting.items():
            if len(setting) < 2:
                continue
            per_row, per_block, residual = fit(setting, num_blocks * heads)
            fits.append(
                {
                    "S": seq_len,
                    "backend": backend,
                    "mask_mod": mask_name,
                    "us per row": per_row,
                    "us per block": per_block,
                    "row cost in blocks": per_row / per_block,
                    "cuDNN us per block": (
                        cudnn * 1e3 / (causal_blocks * heads) if cudnn is not None else None
                    ),
                    "max rel residual": residual,
                }
            )
    notes = [
        f"Inputs: randn, B=1, Hq={heads}, Hkv={kv_heads}, D={dim}, {dtype}; q_block = kv_block"
        f" = {config.q_block}. Mask: each query-block row keeps the band of 'blocks per row'"
        " blocks ending at its diagonal (the diagonal block partial, the rest full).",
        "density = kept blocks / causal blocks (the diagonal counted whole, as flexsample's"
        " density does); efficiency vs cuDNN = density x SDPA cuDNN dense causal ms / ms.",
        "mask_mod 'sampled': keep_block_mask's, which reads the keep matrix (what"
        " sample_block_mask returns); 'causal': with_causal_mask_mod,"
        " the same lists under q >= kv (what sparse_attention runs). Fused kernels evaluate the"
        " mask_mod on partial blocks only.",
        "Fit: ms = (query-block rows x heads) x 'us per row' + kept blocks x 'us per block',"
        " least squares over the blocks-per-row sweep; 'row cost in blocks' = their ratio: the"
        " fixed work of a row (Q load, output, launch share) in units of one kept block.",
        "Times are medians of triton.testing.do_bench.",
    ]
    path = write_results(
        "block_cost",
        "Sparse attention cost per kept block and per row",
        [("Band masks", COLUMNS, rows), ("Fit", FIT_COLUMNS, fits)],
        notes,
        out_dir,
    )
    print(open(path).read())


if __name__ == "__main__":
    main()
