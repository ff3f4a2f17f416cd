"""FlashAttention-4 called directly on flexsample's masks vs through flex_attention (#19 profile).

flex_attention's FLASH backend hands FA4 the BlockMask's lists and its causal `mask_mod`, and
no `causal` flag: FA4 then evaluates the mask_mod on every partial block and, on sm90, runs
its plain `SingleTileScheduler` (query tiles in index order). Called directly with
`causal=True` and no mask_mod, FA4 applies its built-in causal mask and picks its
`SingleTileLPTScheduler` (longest query tiles first, heads swizzled to share K/V in L2).
This bench measures what that difference is worth on flexsample's masks, Llama-3-8B attention
shape (B 1, Hq 32, Hkv 8, D 128, bf16), structured inputs:
- "cuDNN dense": SDPA cuDNN on K/V expanded to Hq heads (expansion not timed);
- "FA4 dense causal": FA4 directly, causal, no block sparsity;
- "flex FLASH": `attention_with_mask` under the causal mask_mod, BACKEND FLASH (the op's
  kernel; the op also splits the dense tail's rows apart where `tail.plan` applies, which this
  bench does not);
- "FA4 causal lists": FA4 directly, `causal=True`, the BlockMask's partial and full lists;
- "FA4 causal full": the same with every kept block in the full lists (sorted ascending).
Efficiency = density x cuDNN dense ms / sparse ms (issue #19's definition); "max diff" is the
largest |FA4 direct - flex FLASH| over the output. Times: triton.testing.do_bench medians.

Run on a GPU with FA4 installed (bench/fa4_install.sh, FLEXSAMPLE_FA4_SITE):
`python -m bench.fa4_direct --lengths 32768 131072`.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.attention import fixed_density
from bench.harness import progress, time_ms, write_results
from flexsample import SampleConfig, sample_block_mask
from flexsample.attention import attention_with_mask
from flexsample.block_mask import kept_blocks, with_causal_mask_mod
from flexsample.flex_backend import add_fa4_site, kernel_options
from flexsample.metrics import block_density
from flexsample.synthetic import structured_qkv

COLUMNS = [
    "S",
    "config",
    "density",
    "cuDNN dense ms",
    "FA4 dense causal ms",
    "flex FLASH ms",
    "FA4 causal lists ms",
    "FA4 causal full ms",
    "eff flex FLASH",
    "eff FA4 causal lists",
    "eff FA4 causal full",
    "max diff",
]


def sparse_tensors(block_mask, all_full: bool):
    """FA4's BlockSparseTensorsTorch from a flexsample BlockMask: its own partial and full
    lists, or (`all_full`) every kept block as a full block in ascending order."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    size = tuple(block_mask.BLOCK_SIZE)
    if not all_full:
        return BlockSparseTensorsTorch(
            block_mask.kv_num_blocks,
            block_mask.kv_indices,
            block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices,
            block_size=size,
        )
    keep = kept_blocks(block_mask)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    count = keep.sum(-1, dtype=torch.int32)
    empty = torch.zeros_like(count)
    return BlockSparseTensorsTorch(
        empty, torch.zeros_like(order[..., :1]), count, order.contiguous(), block_size=size
    )


def fa4(q, k, v, tensors):
    """FA4 forward, causal, `[B, H, S, D]` in and out (FA4 takes `[B, S, H, D]`)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, *_ = _flash_attn_fwd(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        softmax_scale=q.shape[-1] ** -0.5,
        causal=True,
        block_sparse_tensors=tensors,
    )
    return out.transpose(1, 2)


def measure(seq_len: int, name: str, config: SampleConfig, x, dense: dict) -> dict:
    mask = sample_block_mask(x.q, x.k, config)
    keep = kept_blocks(mask)
    row = {"S": seq_len, "config": name, **dense}
    row["density"] = block_density(keep, seq_len, seq_len, 128, 128).mean().item()
    options = kernel_options(
        x.q, dataclasses.replace(config, flex_backend="flash"), k=x.k, v=x.v, block_mask=mask
    )
    run_mask = with_causal_mask_mod(mask)

    def flex():
        return attention_with_mask(x.q, x.k, x.v, run_mask, enable_gqa=True, kernel_options=options)

    reference = flex()
    row["flex FLASH ms"] = time_ms(flex)
    diffs = []
    for label, all_full in (("lists", False), ("full", True)):
        tensors = sparse_tensors(mask, all_full)
        out = fa4(x.q, x.k, x.v, tensors)
        diffs.append((out.float() - reference.float()).abs().max().item())
        row[f"FA4 causal {label} ms"] = time_ms(lambda t=tensors: fa4(x.q, x.k, x.v, t))
    row["max diff"] = max(diffs)
    for label, column in (
        ("flex FLASH", "flex FLASH ms"),
        ("FA4 causal lists", "FA4 causal lists ms"),
        ("FA4 causal full", "FA4 causal full ms"),
    ):
        row[f"eff {label}"] = row["density"] * dense["cuDNN dense ms"] / row[column]
    progress(f"  {row}")
    return row


def dense_times(x) -> dict:
    """cuDNN dense (K/V expanded outside the timing) and FA4 dense causal, in ms."""
    ke, ve = (t.repeat_interleave(x.q.shape[1] // t.shape[1], 1) for t in (x.k, x.v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = time_ms(lambda: F.scaled_dot_product_attention(x.q, ke, ve, is_causal=True))
    return {
        "cuDNN dense ms": cudnn,
        "FA4 dense causal ms": time_ms(lambda: fa4(x.q, x.k, x.v, None)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--name", default="fa4_direct")
    args = parser.parse_args(argv)
    add_fa4_site()
    base = SampleConfig(min_seq_len=0)
    configs = {"default": base, "~5%": fixed_density(0.05, base)}
    rows = []
    for seq_len in args.lengths:
        x = structured_qkv(1, 32, 8, seq_len, 128, seed=0, dtype=torch.bfloat16, device="cuda")
        dense = dense_times(x)
        for name, config in configs.items():
            rows.append(measure(seq_len, name, config, x, dense))
        path = write_results(
            args.name,
            "FA4 direct vs flex FLASH",
            [("Sparse attention", COLUMNS, rows)],
            [" ".join(__doc__.split("\n\n")[1].split()), f"Configs: {configs}."],
        )
    print(path.read_text())


if __name__ == "__main__":
    main()
