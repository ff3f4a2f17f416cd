"""Time to first token of a randomly initialised Llama-3-8B-shaped model (transformers, bf16).

Modes: eager SDPA; torch.compile (inductor); torch.compile(backend=flexsample) at fixed
densities (and at the default config with `--modes ... flexsample`). Random weights give
near-uniform attention, so the default config keeps almost every block there; the
fixed-density rows use alpha=1 with a window and a stripe cap (`bench.attention.fixed_density`),
and their density is measured on q/k of the same shape. Each compiled mode is compiled once
with a dynamic sequence length and serves every length. Prefill only (use_cache=False),
last-token logits (logits_to_keep=1). Results are rewritten after every row.
Writes bench/results/ttft.{md,json}. GPU: `python -m bench.ttft --lengths 32768 131072`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import flexsample
from bench.attention import fixed_density
from bench.harness import progress, write_results
from flexsample import SampleConfig, sample_block_mask
from flexsample.compile import report, reset_report
from flexsample.metrics import density

COLUMNS = [
    "S",
    "mode",
    "density",
    "compile s",
    "prefill s",
    "x vs eager SDPA",
    "rewritten",
    "paths",
]
FIXED = {f"flexsample ~{round(100 * d)}%": fixed_density(d, SampleConfig()) for d in (0.1, 0.2)}


def llama3_8b(layers: int, max_len: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            config, torch_dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model.eval()


def _measured_density(config: SampleConfig, seq_len: int) -> float:
    q = torch.randn(1, 32, seq_len, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, seq_len, 128, device="cuda", dtype=torch.bfloat16)
    return density(sample_block_mask(q, k, config)).mean().item()


def _time_prefill(fn, ids, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` later calls), synchronised."""

    def once() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            fn(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    first = once()
    return first, statistics.median(once() for _ in range(repeats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["eager", *FIXED, "inductor"])
    parser.add_argument("--name", default="ttft")
    args = parser.parse_args(argv)

    model = llama3_8b(args.layers, max(args.lengths))
    rows, eager_s = [], {}
    for mode in args.modes:
        torch._dynamo.reset()
        config = FIXED.get(mode, SampleConfig())
        if mode == "eager":
            fn = model
        elif mode == "inductor":
            fn = torch.compile(model, dynamic=True)
        else:
            fn = torch.compile(model, backend=flexsample.backend(config), dynamic=True)
        for seq_len in args.lengths:
            reset_report()
            flexsample.path_counts.clear()
            ids = torch.randint(0, 128256, (1, seq_len), device="cuda")
            progress(f"S={seq_len} {mode}: running")
            row = {"S": seq_len, "mode": mode}
            try:
                first, median = _time_prefill(fn, ids, args.repeats)
            except torch.OutOfMemoryError as err:
                row["paths"] = f"out of memory: {str(err).splitlines()[0][:80]}"
                rows.append(row)
                progress(f"  {row['paths']}")
                continue
            finally:
                del ids
                torch.cuda.empty_cache()
            row["prefill s"] = median
            row["compile s"] = first - median if mode != "eager" else 0.0
            if mode == "eager":
                eager_s[seq_len] = median
            if seq_len in eager_s:
                row["x vs eager SDPA"] = eager_s[seq_len] / median
            if mode.startswith("flexsample"):
                row["rewritten"] = report().rewritten
                row["paths"] = " ".join(
                    f"{k}={v}" for k, v in sorted(flexsample.path_counts.items())
                )
                row["density"] = _measured_density(config, seq_len) if mode in FIXED else "adaptive"
            rows.append(row)
            progress(f"  prefill {median:.3f}s (first call {first:.1f}s) {row.get('paths', '')}")
            _write(args, rows)
    print(open(_write(args, rows)).read())


def _write(args: argparse.Namespace, rows: list[dict]):
    notes = [
        f"Model: random-init Llama-3-8B shape ({args.layers} layers, hidden 4096, Hq 32, Hkv 8, "
        "D 128, vocab 128256), bf16, transformers attn_implementation='sdpa' as the base.",
        f"Prefill times are medians of {args.repeats} calls after a first call; 'compile s' is "
        "the first call minus the median (compiled modes use dynamic=True: the first length "
        "pays the compile, later lengths may pay a recompile).",
        "Default-config flexsample on random weights keeps nearly every block (near-uniform "
        "attention), so its row measures overhead, not the benefit on a trained model.",
        "Fixed-density rows: " + "; ".join(f"{k}: {v}" for k, v in FIXED.items()) + ". Their "
        "density is measured on random bf16 q/k of the same shape.",
        "'paths' counts sample_attention calls by path over all calls (first + repeats), "
        "32 per forward.",
    ]
    return write_results(args.name, "Time to first token", [("TTFT", COLUMNS, rows)], notes)


if __name__ == "__main__":
    main()
