"""Demo: SampleAttention on structured inputs; prints per-head density, true CRA and error.

Run `python -m flexsample.demo` (CPU, well under a minute) or pass `--device cuda --seq-len
32768` on a GPU.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from flexsample import SampleConfig, sample_attention, sample_block_mask
from flexsample.block_mask import kept_blocks
from flexsample.metrics import density, true_cra
from flexsample.synthetic import structured_qkv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--q-heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=SampleConfig.alpha)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # min_seq_len=0: the demo's short sequence would otherwise take the dense path on purpose.
    config = SampleConfig(alpha=args.alpha, min_seq_len=0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    x = structured_qkv(
        1,
        args.q_heads,
        args.kv_heads,
        args.seq_len,
        args.head_dim,
        seed=args.seed,
        dtype=dtype,
        device=args.device,
    )
    print(
        f"flexsample demo: S={args.seq_len} Hq={args.q_heads} Hkv={args.kv_heads} "
        f"D={args.head_dim} {dtype} on {args.device}; {config}"
    )

    start = time.perf_counter()
    block_mask = sample_block_mask(x.q, x.k, config)
    out = sample_attention(x.q, x.k, x.v, config, enable_gqa=True)
    elapsed = time.perf_counter() - start
    dense = F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, enable_gqa=True)

    per_head_density = density(block_mask)[0]
    cra = true_cra(x.q, x.k, kept_blocks(block_mask), config)[0]
    err = ((out.float() - dense.float()).norm(dim=(-1, -2)) / dense.float().norm(dim=(-1, -2)))[0]
    print(
        f"{'head':>4} {'kind':>8} {'density':>8} {'CRA min':>8} {'CRA p1':>8} "
        f"{'CRA mean':>8} {'rel err':>8}"
    )
    for h in range(args.q_heads):
        print(
            f"{h:>4} {x.head_kinds[h]:>8} {per_head_density[h]:>8.3f} {cra[h].min():>8.3f} "
            f"{cra[h].quantile(0.01):>8.3f} {cra[h].mean():>8.3f} {err[h]:>8.4f}"
        )
    print(
        f"mean density {per_head_density.mean():.3f}, mean CRA {cra.mean():.4f} "
        f"(alpha {config.alpha}), max rel err {err.max():.4f}; mask + attention took "
        f"{elapsed:.2f}s"
    )


if __name__ == "__main__":
    main()
