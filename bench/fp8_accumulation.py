"""The e4m3 estimate's accumulation: `tl.dot`'s max_num_imprecise_acc against accuracy and time.

With `estimate_fp8` the estimate kernel's dots read e4m3 q and k (`flexsample/fp8.py`). Their
products are exact, but on sm_90 Triton lets the tensor cores sum them in less than fp32 unless
told to promote every N products (`kernels.antidiagonal.FP8_IMPRECISE_ACC`). Per cell score and
N: the relative RMS error of the kernel's estimate against the PyTorch path's exact scores of
the same rounded inputs (`--check-len`), and the kernel's time (`--lengths`), beside the bf16
kernel. Llama-3-8B attention shape (32 / 8 heads, D 128), structured inputs, bf16.
Writes bench/results/fp8_accumulation.{md,json}. GPU (sm_89+) only:
`python -m bench.fp8_accumulation`.
"""

from __future__ import annotations

import argparse

import torch

from bench.harness import RESULTS, progress, time_ms, write_results
from flexsample import SampleConfig, fp8
from flexsample.antidiagonal import CHUNK_ELEMENTS, torch_antidiagonal_scores
from flexsample.kernels import antidiagonal as kernels
from flexsample.synthetic import structured_qkv

COLUMNS = ["cell_score", "imprecise_acc", "rel RMS mass", "rel RMS peak", "ms", "bf16 ms"]


def _operands(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """e4m3 q and k, their values back in fp32, and the kernel's per-head logit factor."""
    q8, k8, qs, ks = fp8.operands(q, k, kernel=True)
    back = fp8.dequantize(q8, qs, torch.float32), fp8.dequantize(k8, ks, torch.float32)
    return q8, k8, *back, fp8.logit_factor(qs, ks)


def _kernel_ms(q: torch.Tensor, k: torch.Tensor, config: SampleConfig, **launch) -> float:
    """Median ms of the estimate kernels on q `[B, Hq, S, D]` and k `[B, Hkv, S, D]`."""
    return time_ms(
        lambda: kernels.triton_antidiagonal_scores(
            q, k, config, 128**-0.5, chunk_elements=CHUNK_ELEMENTS, **launch
        )
    )


def _rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-len", type=int, default=16384 + 77)
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--imprecise-acc", type=int, nargs="+", default=[0, 64, 32])
    parser.add_argument("--name", default="fp8_accumulation")
    args = parser.parse_args(argv)
    scale = 128**-0.5
    rows = []
    x = structured_qkv(1, 32, 8, args.check_len, 128, dtype=torch.bfloat16, device="cuda")
    q8, k8, q_back, k_back, head_scale = _operands(x.q, x.k)
    for cell in ("max", "mean"):
        config = SampleConfig(cell_score=cell)
        want = torch_antidiagonal_scores(q_back, k_back, config, scale)
        for acc in args.imprecise_acc:
            got = kernels.triton_antidiagonal_scores(
                q8,
                k8,
                config,
                scale,
                chunk_elements=CHUNK_ELEMENTS,
                head_scale=head_scale,
                imprecise_acc=acc,
            )
            row = {"S": args.check_len, "cell_score": cell, "imprecise_acc": acc}
            row |= {"rel RMS mass": _rel_rms(got.mass, want.mass)}
            row |= {"rel RMS peak": _rel_rms(got.peak, want.peak)}
            rows.append(row)
            progress(str(row))
    del x, q8, k8, q_back, k_back
    for seq_len in args.lengths:
        torch.cuda.empty_cache()
        x = structured_qkv(1, 32, 8, seq_len, 128, dtype=torch.bfloat16, device="cuda")
        q8, k8, _, _, head_scale = _operands(x.q, x.k)
        for cell in ("max", "mean"):
            config = SampleConfig(cell_score=cell)
            bf16_ms = _kernel_ms(x.q, x.k, config)
            for acc in args.imprecise_acc:
                ms = _kernel_ms(q8, k8, config, head_scale=head_scale, imprecise_acc=acc)
                row = {"S": seq_len, "cell_score": cell, "imprecise_acc": acc, "ms": ms}
                rows.append(row | {"bf16 ms": bf16_ms})
                progress(str(rows[-1]))
    notes = [
        "Errors: the kernel on e4m3 q and k (per-head power-of-two scales, head_scale) against "
        "torch_antidiagonal_scores on the same rounded values in fp32 (exact products, fp32 "
        "sums), relative RMS over the whole estimate, at S = --check-len.",
        "Times: medians of triton.testing.do_bench of the estimate kernels alone (the e4m3 "
        "tensors made beforehand); 'bf16 ms' the same kernels on the bf16 inputs.",
        "imprecise_acc: tl.dot's max_num_imprecise_acc, products summed before each promotion "
        "to fp32 (0: Triton's default on sm_90, no promotion).",
        f"Default at the time of the run: FP8_IMPRECISE_ACC = {kernels.FP8_IMPRECISE_ACC}.",
    ]
    path = write_results(
        args.name,
        "e4m3 estimate: accumulation against accuracy and time",
        [("Accumulation", ["S", *COLUMNS], rows)],
        notes,
        RESULTS,
    )
    progress(f"results: {path}")


if __name__ == "__main__":
    main()
