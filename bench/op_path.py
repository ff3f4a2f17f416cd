"""Where the compiler path spends time beyond the attention itself, at one length.

Times (ms, do_bench medians) on structured inputs of the Llama-3-8B attention shape:
sample_attention on contiguous [B, H, S, D]; the same through the flexsample op on q/k/v in
transformers' layout ([B, S, H, D] memory, transposed views); the op given an explicit causal
mask (as traced transformers 5.17 passes it), with its run-time check remembered and not;
the check alone. GPU: `python -m bench.op_path --length 131072`.
"""

from __future__ import annotations

import argparse

import torch

from bench.harness import progress, time_ms
from flexsample import SampleConfig, sample_attention
from flexsample.compile import causal_mask
from flexsample.compile.op import config_to_str
from flexsample.testing import structured_qkv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=131072)
    args = parser.parse_args(argv)
    config = SampleConfig(alpha=1.0, window_ratio=0.02, max_stripe_ratio=0.045)
    x = structured_qkv(1, 32, 8, args.length, 128, dtype=torch.bfloat16, device="cuda")
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (x.q, x.k, x.v))
    op = torch.ops.flexsample.sample_attention
    text = config_to_str(config)
    mask = torch.ones(args.length, args.length, dtype=torch.bool, device="cuda").tril()
    mask = mask[None, None]

    def forget_then_op():
        causal_mask._last = None
        return op(q, k, v, mask, None, True, text)

    times = {
        "sample_attention contiguous": lambda: sample_attention(x.q, x.k, x.v, config,
                                                                enable_gqa=True),
        "op, transformers layout": lambda: op(q, k, v, None, None, True, text),
        "op + causal mask, check remembered": lambda: op(q, k, v, mask, None, True, text),
        "op + causal mask, checked every call": forget_then_op,
        "causal check alone": lambda: causal_mask._check(mask),
    }
    for name, fn in times.items():
        progress(f"{name}: {time_ms(fn):.2f} ms")


if __name__ == "__main__":
    main()
