"""Where the compiler path spends time beyond the attention itself, at one length.

Times (ms, do_bench medians) on structured inputs of the Llama-3-8B attention shape:
sample_attention on contiguous [B, H, S, D]; the same through the flexsample op on q/k/v in
transformers' layout ([B, S, H, D] memory, transposed views); the op given an explicit causal
mask (as traced transformers 5.17 passes it, checked on every call); the check alone.
Writes bench/results/op_path.{md,json}. GPU: `python -m bench.op_path --length 131072`.
"""

from __future__ import annotations

import argparse

import torch

from bench.harness import progress, time_ms, write_results
from flexsample import SampleConfig, sample_attention
from flexsample.causal_mask import is_causal_mask
from flexsample.op import config_to_str
from flexsample.synthetic import structured_qkv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=131072)
    args = parser.parse_args(argv)
    config = SampleConfig(estimator="stripes", alpha=1.0, window_ratio=0.02, max_stripe_ratio=0.045)
    x = structured_qkv(1, 32, 8, args.length, 128, dtype=torch.bfloat16, device="cuda")
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (x.q, x.k, x.v))
    op = torch.ops.flexsample.sample_attention
    text = config_to_str(config)
    mask = torch.ones(args.length, args.length, dtype=torch.bool, device="cuda").tril()
    mask = mask[None, None]

    times = {
        "sample_attention contiguous": lambda: sample_attention(
            x.q, x.k, x.v, config, enable_gqa=True
        ),
        "op, transformers layout": lambda: op(q, k, v, None, None, True, text),
        "op + causal mask (checked every call)": lambda: op(q, k, v, mask, None, True, text),
        "causal check alone": lambda: is_causal_mask(mask),
    }
    rows = []
    for name, fn in times.items():
        rows.append({"path": name, "ms": time_ms(fn)})
        progress(f"{name}: {rows[-1]['ms']:.2f} ms")
    notes = [
        f"S={args.length}, B=1, Hq=32, Hkv=8, D=128, bf16, structured_qkv inputs.",
        f"Config: {config}.",
    ]
    path = write_results(
        "op_path", "Compiler-path costs per layer", [("Per call", ["path", "ms"], rows)], notes
    )
    print(open(path).read())


if __name__ == "__main__":
    main()
