"""Time to first token with tensor parallelism: transformers' TP (`DistributedConfig(tp_size=W)`)
with `attn_implementation="flexsample"` vs SDPA, and the same modes on one GPU.

Launch: `torchrun --nproc_per_node 2 -m bench.tp_ttft` (one process per GPU, NCCL; NVLink
multicast off: NCCL_NVLS_ENABLE=0 unless set). The model is a random-init Llama-3-8B shape
(bench.ttft.llama3_8b's config, `--layers`), saved once by rank 0 to `--checkpoint` (TP loads
from a checkpoint) and loaded by every rank with its share of the heads. Modes (one loaded
model, switched with `set_attn_implementation`): "sdpa" (transformers' SDPA, dense),
"flexsample ~10%" (alpha 1 with a window and a stripe cap: `bench.attention.fixed_density`,
random weights give near-uniform attention, so the adaptive config keeps almost every block),
and "flexsample default". Prefill only (use_cache=False), last-token logits, no_grad;
a call's time is the slowest rank's (calls start together after a barrier), median of
`--repeats` calls after a first call. Then rank 0 alone loads the model without TP and times
the same modes on one GPU (`--single-lengths`), for the single-GPU speedup in the same run.
Also checks, at `--check-len`, that TP flexsample at alpha = 1 gives the TP SDPA logits.
Rank 0 writes bench/results/tp_ttft.{md,json} (`--name`) after every row. CPU smoke run
(gloo, a tiny Llama, bench/results/cpu): `torchrun --nproc_per_node 2 -m bench.tp_ttft --cpu-smoke`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import statistics
import time

import torch
import torch.distributed as dist

import flexsample
from bench.attention import fixed_density
from bench.harness import RESULTS, progress, write_results
from flexsample import SampleConfig
from flexsample.integrations.transformers import register

COLUMNS = ["S", "GPUs", "mode", "prefill s", "x vs sdpa", "paths"]
CHECK_COLUMNS = ["S", "GPUs", "max abs logit diff", "max abs logit", "paths"]
MODES = {
    "flexsample ~10%": fixed_density(0.1, SampleConfig()),
    "flexsample default": SampleConfig(),
}
#: Llama-3-8B's shape (the GPU run) and a tiny Llama (the CPU smoke run).
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_theta=500000.0,
)
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def make_checkpoint(path: pathlib.Path, shape: dict, layers: int, max_len: int, device: str):
    """Random-init weights (seed 0, bf16, built on `device`), saved for TP loading."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        **shape,
        num_hidden_layers=layers,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def mode_names() -> dict[str, str]:
    """Mode -> attn_implementation name (each flexsample config registered under its own)."""
    names = {"sdpa": "sdpa"}
    for index, (mode, config) in enumerate(MODES.items()):
        names[mode] = register(
            dataclasses.replace(config, min_seq_len=0), name=f"flexsample_{index}"
        )
    return names


def prefill_seconds(model, ids: torch.Tensor, repeats: int, distributed: bool) -> float:
    """Median over `repeats` calls (after a first one) of the slowest rank's prefill seconds."""

    def once() -> float:
        _sync(ids.device.type)
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        _sync(ids.device.type)
        seconds = torch.tensor([time.perf_counter() - start], device=ids.device)
        if distributed:
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        return seconds.item()

    once()
    return statistics.median(once() for _ in range(repeats))


def run_modes(model, lengths, gpus, args, names, rows, distributed: bool) -> None:
    rank = dist.get_rank() if distributed else 0
    for seq_len in lengths:
        ids = torch.randint(0, args.shape["vocab_size"], (1, seq_len), generator=_seed(0))
        ids = ids.to(args.device)
        sdpa_s = None
        for mode, name in names.items():
            model.set_attn_implementation(name)
            flexsample.path_counts.clear()
            row = {"S": seq_len, "GPUs": gpus, "mode": mode}
            try:
                row["prefill s"] = prefill_seconds(model, ids, args.repeats, distributed)
            except torch.OutOfMemoryError as err:
                row["paths"] = f"out of memory: {str(err).splitlines()[0][:80]}"
                if distributed:
                    raise  # another rank may be waiting in a collective: stop here
            _sync(args.device)
            if mode == "sdpa":
                sdpa_s = row.get("prefill s")
            elif sdpa_s and "prefill s" in row:
                row["x vs sdpa"] = sdpa_s / row["prefill s"]
            if mode != "sdpa":
                row["paths"] = " ".join(
                    f"{k}={v}" for k, v in sorted(flexsample.path_counts.items())
                )
            rows.append(row)
            if rank == 0:
                progress(f"S={seq_len} {gpus} GPU {mode}: {row.get('prefill s', 'n/a')}")
                _write(args, rows)


def _seed(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check(model, seq_len: int, world: int, args) -> dict:
    """TP flexsample at alpha = 1 against TP SDPA: last-token logits."""
    ids = torch.randint(0, args.shape["vocab_size"], (1, seq_len), generator=_seed(1))
    ids = ids.to(args.device)
    name = register(SampleConfig(alpha=1.0, min_seq_len=0), name="flexsample_alpha1")
    logits = {}
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        flexsample.path_counts.clear()
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float()
    diff = (logits[name] - logits["sdpa"]).abs().max()
    return {
        "S": seq_len,
        "GPUs": world,
        "max abs logit diff": diff.item(),
        "max abs logit": logits["sdpa"].abs().max().item(),
        "paths": " ".join(f"{k}={v}" for k, v in sorted(flexsample.path_counts.items())),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072, 262144])
    parser.add_argument("--single-lengths", type=int, nargs="*", default=[65536, 131072])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--check-len", type=int, default=32768, help="0 skips the check")
    parser.add_argument("--checkpoint", type=pathlib.Path, default=None)
    parser.add_argument("--name", default="tp_ttft")
    parser.add_argument("--cpu-smoke", action="store_true", help="gloo, a tiny Llama, no GPU")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    timeout = datetime.timedelta(minutes=30)  # rank 0 may be writing the checkpoint
    if args.cpu_smoke:
        args.shape, args.device, args.out_dir, args.layers = TINY, "cpu", RESULTS / "cpu", 2
        args.lengths, args.single_lengths, args.check_len = [256, 512], [256], 256
        dist.init_process_group("gloo", timeout=timeout)
    else:
        args.shape, args.device, args.out_dir = LLAMA3_8B, "cuda", RESULTS
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    args.backend = dist.get_backend()
    max_len = max(args.lengths + args.single_lengths + [args.check_len])
    tag = "tiny" if args.cpu_smoke else "llama3-8b"
    path = args.checkpoint or pathlib.Path(f"/tmp/flexsample-{tag}-{args.layers}l")
    if rank == 0 and not (path / "config.json").exists():
        progress(f"writing the random-init checkpoint to {path}")
        make_checkpoint(path, args.shape, args.layers, max_len, args.device)
    dist.barrier()
    names = mode_names()
    rows: list[dict] = []
    args.rows, args.checks = rows, []

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        max_position_embeddings=max_len,
        distributed_config=DistributedConfig(tp_size=world),
    ).eval()
    if args.check_len:
        args.checks.append(check(model, args.check_len, world, args))
        if rank == 0:
            progress(f"check: {args.checks[-1]}")
    run_modes(model, args.lengths, world, args, names, rows, distributed=True)
    del model
    _sync(args.device)
    dist.barrier()
    dist.destroy_process_group()

    if rank == 0 and args.single_lengths:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.bfloat16,
            attn_implementation="sdpa",
            max_position_embeddings=max_len,
            device_map=args.device,
        ).eval()
        run_modes(model, args.single_lengths, 1, args, names, rows, distributed=False)
    if rank == 0:
        print(open(_write(args, rows)).read())


def _write(args, rows: list[dict]):
    shape = ", ".join(f"{k} {v}" for k, v in args.shape.items())
    notes = [
        f"Model: random-init Llama ({args.layers} layers, {shape}), bf16, loaded from a "
        f"checkpoint; GPUs N > 1 = transformers tensor parallelism (DistributedConfig(tp_size=N), "
        f"{args.backend}, each rank its share of the heads), GPUs 1 = the same checkpoint on rank "
        f"0's device alone ({args.device}).",
        f"Prefill (use_cache=False, logits_to_keep=1), median of {args.repeats} calls after a "
        "first call; with 2 GPUs a call's time is the slower rank's.",
        "Modes: attn_implementation 'sdpa' and flexsample (the transformers door, "
        "integrations.transformers.register) with "
        + "; ".join(f"{k}: {v}" for k, v in MODES.items())
        + " (min_seq_len 0). 'x vs sdpa' = SDPA prefill / mode prefill at the same S and GPUs.",
        "'paths' counts sample_attention calls by path (per rank: its layers times calls).",
        "Check: last-token logits of TP flexsample at alpha = 1 against TP SDPA (same model).",
    ]
    tables = [("TTFT", COLUMNS, rows)]
    if args.checks:
        tables.append(("TP flexsample (alpha = 1) vs TP SDPA", CHECK_COLUMNS, args.checks))
    title = "Time to first token, tensor parallel"
    return write_results(args.name, title, tables, notes, args.out_dir)


if __name__ == "__main__":
    main()
