"""FLASH flex_attention compiled once for every length against once per length.

The op's compiled flex (`flex_backend.run_compiled_flex`) compiles FLASH with a dynamic length;
a static compile (once per length) remains only for mask_mods that FLASH's lowering refuses
symbolically. Per length, in order, on flexsample's own mask (`sample_block_mask` under
`with_causal_mask_mod`, the sparse path's FLASH call, with its LSE): graphs each compiled
function added at that length, its kernel time, and the largest differences of output and LSE
between the two. Llama-3-8B attention shape (32 / 8 heads, D 128), structured inputs, bf16.
Writes bench/results/flash_dynamic.{md,json}. GPU with FA4 only: `python -m bench.flash_dynamic`.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention.flex_attention import AuxRequest

from bench.harness import RESULTS, progress, time_ms, write_results
from flexsample import SampleConfig
from flexsample import flex_backend as fb
from flexsample.attention import sample_block_mask
from flexsample.block_mask import with_causal_mask_mod
from flexsample.synthetic import structured_qkv

COLUMNS = [
    "S",
    "static graphs",
    "dynamic graphs",
    "static ms",
    "dynamic ms",
    "dynamic / static",
    "max |out diff|",
    "max |lse diff|",
]


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _row(seq_len: int, compiled: dict) -> dict:
    """One length: graphs added, times and differences of the compiled functions."""
    x = structured_qkv(1, 32, 8, seq_len, 128, dtype=torch.bfloat16, device="cuda", seed=seq_len)
    mask = with_causal_mask_mod(sample_block_mask(x.q, x.k, SampleConfig()))
    kwargs = {
        "block_mask": mask,
        "scale": 128**-0.5,
        "enable_gqa": True,
        "kernel_options": {"BACKEND": "FLASH"},
        "return_aux": AuxRequest(lse=True),
    }
    row, results = {"S": seq_len}, {}
    for name, fn in compiled.items():
        before = _graphs()
        results[name] = fn(x.q, x.k, x.v, **kwargs)
        row[f"{name} graphs"] = _graphs() - before
        row[f"{name} ms"] = time_ms(lambda fn=fn: fn(x.q, x.k, x.v, **kwargs))
    (out_s, aux_s), (out_d, aux_d) = results["static"], results["dynamic"]
    row["dynamic / static"] = row["dynamic ms"] / row["static ms"]
    row["max |out diff|"] = (out_d.float() - out_s.float()).abs().max().item()
    row["max |lse diff|"] = (aux_d.lse - aux_s.lse).abs().max().item()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[8192, 16384 + 77, 32768, 33768, 131072 + 77]
    )
    parser.add_argument("--name", default="flash_dynamic")
    args = parser.parse_args(argv)
    if fb.flash_import_error() is not None:
        raise SystemExit(f"FA4 is not importable: {fb.flash_import_error()}")
    torch._dynamo.reset()
    compiled = {
        "static": fb._compiled_flex(fb._STATIC_FLASH),
        "dynamic": fb._compiled_flex("FLASH"),
    }
    rows = []
    for seq_len in args.lengths:
        torch.cuda.empty_cache()
        rows.append(_row(seq_len, compiled))
        progress(str(rows[-1]))
    notes = [
        "Both are torch.compile of flex_attention with kernel_options BACKEND=FLASH, in one "
        "process after torch._dynamo.reset(): 'static' dynamic=False, 'dynamic' dynamic=True "
        "(what run_compiled_flex runs). Lengths in the order listed; 'graphs' = dynamo "
        "unique_graphs added by that function's first call at the length (0 = no recompile).",
        "Times: medians of triton.testing.do_bench of one call (mask built beforehand).",
        f"Mask: sample_block_mask with {SampleConfig()} under with_causal_mask_mod.",
    ]
    path = write_results(
        args.name,
        "FLASH flex_attention: one compile for every length",
        [("Static against dynamic compile", COLUMNS, rows)],
        notes,
        RESULTS,
    )
    progress(f"results: {path}")


if __name__ == "__main__":
    main()
