"""The op's cost per call with and without CUDA-graph replay (`SampleConfig.graph_max_len`).

For each attention shape and length: `flexsample::sample_attention` on structured q/k/v in
transformers' layout ([B, S, H, D] memory, transposed views, what both doors pass), default
config, replay on and off (graph_max_len 0). Per call: 'device ms' (do_bench median: calls
back to back, so host work hides behind device work unless it is the longer), 'host ms' (the
Python issue time of one call, averaged over calls without a sync), 'synced ms' (a call and a
device sync, as when every layer's op reads a padding mask on the host: the door's compiled
prefill), and cuDNN SDPA's device ms on the same inputs for scale. Writes
bench/results/op_graphs.{md,json} (`--out-dir`, `--name`).
GPU: `python -m bench.op_graphs --lengths 8192 16384 32768`.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.harness import RESULTS, progress, time_ms, write_results
from flexsample import SampleConfig, graphs, tail
from flexsample.op import config_to_str
from flexsample.synthetic import structured_qkv

SHAPES = {"real-text model (Hq 6, Hkv 2)": (6, 2), "Llama-3-8B (Hq 32, Hkv 8)": (32, 8)}
COLUMNS = [
    "S",
    "shape",
    "replay",
    "split tail",
    "device ms",
    "host ms",
    "synced ms",
    "cuDNN ms",
    "graph MiB",
    "x device",
    "x synced",
]


def _per_call(fn, calls: int, sync_each: bool) -> float:
    """Milliseconds per call on the host clock; with `sync_each` every call waits for the GPU,
    else only the issue time (no sync inside the loop) is counted."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
        if sync_each:
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def measure(
    length: int, heads: int, kv_heads: int, calls: int, splits: tuple[bool, ...] = (True,)
) -> list[dict]:
    x = structured_qkv(1, heads, kv_heads, length, 128, dtype=torch.bfloat16, device="cuda")
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (x.q, x.k, x.v))
    op = torch.ops.flexsample.sample_attention
    group = heads // kv_heads
    ke, ve = x.k.repeat_interleave(group, 1), x.v.repeat_interleave(group, 1)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense = time_ms(lambda: F.scaled_dot_product_attention(x.q, ke, ve, is_causal=True))
    rows = []
    for replay, split in ((r, t) for r in (False, True) for t in splits):
        config = SampleConfig(graph_max_len=length if replay else 0, split_tail=split)
        text = config_to_str(config)

        def call(text=text):
            return op(q, k, v, None, None, True, text)

        graphs.clear()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved()
        call()  # captures where it replays; its output is freed at once
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # what stays reserved is the graph's
        held = (torch.cuda.memory_reserved() - before) / 2**20
        for _ in range(2):
            call()
        row = {
            "S": length,
            "replay": replay,
            "split tail": split,
            "device ms": time_ms(call),
            "host ms": _per_call(call, calls, sync_each=False),
            "synced ms": _per_call(call, calls, sync_each=True),
            "cuDNN ms": dense,
            "graph MiB": held if replay else None,
        }
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["x device"] = base["device ms"] / row["device ms"]
        row["x synced"] = base["synced ms"] / row["synced ms"]
    graphs.clear()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--name", default="op_graphs")
    parser.add_argument(
        "--split-tail",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="SampleConfig.split_tail values to run (each with replay on and off)",
    )
    args = parser.parse_args(argv)
    splits = tuple(choice == "on" for choice in args.split_tail)
    rows = []
    for length in args.lengths:
        for shape, (heads, kv_heads) in SHAPES.items():
            for row in measure(length, heads, kv_heads, args.calls, splits):
                rows.append({"shape": shape, **row})
                progress(f"{length} {shape} replay={row['replay']}: {row}")
    notes = [
        "Inputs: flexsample.synthetic.structured_qkv(seed=0), B 1, D 128, bf16, in transformers' "
        "layout; the op with the default config "
        f"({dataclasses.replace(SampleConfig(), graph_max_len=0)}, graph_max_len = S for "
        "'replay' True, 0 for False; split_tail as in 'split tail': the dense tail's rows run "
        "apart (flexsample/tail.py) where tail.plan applies, at any length when replayed, "
        f"from {tail.EAGER_MIN_BLOCKS} query blocks unreplayed).",
        "device ms: triton.testing.do_bench median. host ms: issue time per call over "
        f"{args.calls} calls without a sync. synced ms: per call with a torch.cuda.synchronize "
        "after each. 'x device' / 'x synced': the unreplayed row's time over this row's.",
        "cuDNN ms: SDPA's cuDNN backend, causal, on contiguous q and K/V expanded to Hq heads "
        "(as bench.dense times it).",
        "graph MiB: memory the first (capturing) call leaves reserved after empty_cache: the "
        "graph's static inputs, output and private pool of temporaries.",
    ]
    path = write_results(
        args.name,
        "The op with and without CUDA-graph replay",
        [("Per call", COLUMNS, rows)],
        notes,
        args.out_dir,
    )
    print(open(path).read())


if __name__ == "__main__":
    main()
