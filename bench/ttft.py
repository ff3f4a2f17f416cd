"""Time to first token of a randomly initialised Llama-3-8B-shaped model (transformers, bf16).

One row per (length, mode). Modes (`--modes`, default all but `flexsample`):
- `eager`: the model with transformers' SDPA attention, uncompiled.
- `inductor`: `torch.compile(model, dynamic=True)` of the SDPA model (traced transformers
  passes SDPA an explicit `[B, 1, S, S]` causal mask: its packing check cannot run traced).
- `inductor causal`: the same with transformers' own SDPA function registered under a mask
  function that builds no mask (`sdpa-causal`), so SDPA runs `is_causal=True` on its
  flash/cuDNN kernels: the fastest dense compiled path a user can pick (a few lines).
- `no-attention`: the same weights with attention replaced by a copy of v (the
  `copy-v` transformers attention function: v repeated to the query heads; its mask function
  builds no mask), compiled like `inductor`: the limit any attention speedup can reach.
- `flexsample ~5%` / `~10%` / `~20%`: `torch.compile(model, backend=flexsample.backend(cfg),
  dynamic=True)` at fixed densities (alpha=1 with a window and a stripe cap,
  `bench.attention.fixed_density`; density measured on random q/k of the same shape);
  `flexsample` is the same at the default config.
- `door ~10%` / `door default`: `flexsample.integrations.transformers.register(cfg)`, the
  model switched to `attn_implementation="flexsample"`, then `torch.compile(model,
  dynamic=True)` (inductor): the path that passes no S×S mask. `door group`: the default
  with `group_estimate=True`.
- `door ~10% layers` / `door ~5% layers` / `door default layers`: the same door, compiled by region
  (`integrations.transformers.compile_model`: each decoder layer `layer.compile(dynamic=True)`,
  one compiled graph shared by the 32 identical layers), the rest eager: the compile-time
  option.
Random weights give near-uniform attention, so the default config keeps almost every block:
its rows measure overhead, not the benefit on a trained model.

Each compiled mode is compiled once (after `torch._dynamo.reset()`), with a dynamic sequence
length, and serves every length in order; per row: median prefill, first call, compile (first
call minus median), graphs compiled at that length (dynamo's `unique_graphs` counter: the
first length's are the compile, later ones are recompiles), peak memory (CUDA), the op's
paths, x vs eager, x vs the fastest dense row (eager, inductor) of the length, and the share
of the no-attention limit reached, (eager - mode) / (eager - no-attention). Out-of-memory rows
are recorded. `--profile L [L ...]` adds one profiled prefill of `eager` and `door ~10%` at
each L (torch.profiler, CUDA activities; CPU only without a GPU): the top ops by device time
and their sum per part (flexsample ops, flex_attention kernels, the causal check, copies,
matmuls, the rest). Prefill only (use_cache=False), last-token logits (logits_to_keep=1).
Results are rewritten after every row; `--append` keeps the rows of an earlier run of the
same `--name` in `--out` that this run does not measure (several commands, one table).

`--model DIR` times a trained checkpoint instead (`bench.train_realtext --out DIR`, the
real-text judge's model) on prompts cut from its held-out documents, so that the default
config selects on real attention: `python -m bench.train_realtext --out /tmp/rt`, then
`python -m bench.ttft --model /tmp/rt --modes eager "inductor causal" "door default"
--lengths 16384 32768`.

Writes bench/results/ttft.{md,json} (`--out`, `--name`). On one H100 the whole set does not
fit one 10-minute command: run mode groups with `--out /tmp/ttft --append` on one machine
(`eager inductor no-attention`; `"flexsample ~5%" "flexsample ~10%"`; `"flexsample ~20%"
"door ~10%"`; `"door default"`; `eager "door ~10%" --lengths --profile 32768 131072`).
`--cpu-smoke` runs every mode on a tiny 2-layer model on CPU (lengths 64 and 96, blocks of
32), compiled with `--compiler aot_eager` (flexsample's rewrite, then aot_eager) so that it
takes well under a minute; it checks the plumbing, not inductor or the timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import statistics
import time

import torch

import flexsample
from bench.attention import fixed_density
from bench.harness import RESULTS, progress, write_results
from flexsample import SampleConfig, sample_block_mask
from flexsample.compile import report, reset_report
from flexsample.flex_backend import resolve_flex_backend
from flexsample.metrics import density

COLUMNS = [
    "S",
    "mode",
    "density",
    "prefill s",
    "first call s",
    "compile s",
    "graphs compiled",
    "peak GiB",
    "x vs eager SDPA",
    "x vs fastest dense",
    "share of limit",
    "flex backend",
    "rewritten",
    "paths",
]
PROFILE_COLUMNS = ["S", "mode", "part", "op", "device ms", "calls"]
PART_COLUMNS = ["S", "mode", "part", "device ms", "share"]
DENSE = ("eager", "inductor", "inductor causal")
DENSITIES = {"~5%": 0.05, "~10%": 0.1, "~20%": 0.2}
MODES = [
    "eager",
    "inductor",
    "inductor causal",
    "no-attention",
    *(f"flexsample {k}" for k in DENSITIES),
    *(f"door {k}" for k in DENSITIES),
    "door ~10% layers",
    "door ~5% layers",
    "door default",
    "door default layers",
    "door group",
    "door ~10% unreplayed",
    "door default unreplayed",
]
ALL_MODES = [*MODES, "flexsample"]
PROFILED = ("eager", "door ~10%", "door default")
COPY_V = "copy-v"
SDPA_CAUSAL = "sdpa-causal"


@dataclasses.dataclass
class Setup:
    """What the sizes of a run are: the Llama-3-8B shape on CUDA, or a tiny one on CPU."""

    device: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: torch.dtype
    base: SampleConfig
    #: A trained checkpoint (`--model`): its weights, and prompts from its held-out text.
    model_dir: pathlib.Path | None = None
    dim: int | None = None

    @property
    def head_dim(self) -> int:
        return self.dim or self.hidden // self.heads


def gpu_setup(layers: int) -> Setup:
    return Setup("cuda", layers, 4096, 14336, 32, 8, 128256, torch.bfloat16, SampleConfig())


def smoke_setup() -> Setup:
    # Blocks of 32 and no length floor, so the tiny lengths run sparse.
    base = SampleConfig(min_seq_len=0, q_block=32, kv_block=32)
    return Setup("cpu", 2, 64, 128, 4, 2, 256, torch.float32, base)


def checkpoint_setup(model_dir: pathlib.Path, smoke: bool) -> Setup:
    """The sizes of a trained checkpoint (`bench.train_realtext --out`), on CUDA in bf16, or on
    CPU in fp32 with the smoke run's blocks of 32."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    device, dtype, base = (
        ("cpu", torch.float32, smoke_setup().base)
        if smoke
        else ("cuda", torch.bfloat16, SampleConfig())
    )
    return Setup(
        device,
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        dtype,
        base,
        model_dir=model_dir,
        dim=getattr(c, "head_dim", None),
    )


def prompt_ids(setup: Setup, seq_len: int) -> torch.Tensor:
    """`[1, seq_len]` prompt: random token ids, or for a trained checkpoint its held-out
    documents (`bench.realtext.eval_documents`) joined in their order."""
    if setup.model_dir is None:
        return torch.randint(0, setup.vocab, (1, seq_len), device=setup.device)
    tokens = _held_out_tokens(setup.model_dir)
    if tokens.numel() < seq_len:
        raise ValueError(
            f"{setup.model_dir}: {tokens.numel()} held-out tokens, fewer than {seq_len}"
        )
    return tokens[:seq_len].to(setup.device)[None]


@functools.cache
def _held_out_tokens(model_dir: pathlib.Path) -> torch.Tensor:
    import numpy as np
    from transformers import AutoTokenizer

    from bench.realtext import eval_documents

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs, _, _ = eval_documents(model_dir, tokenizer, length=None, count=None)
    return torch.from_numpy(np.concatenate(docs).astype(np.int64))


def config_of(mode: str, base: SampleConfig) -> SampleConfig:
    """The SampleConfig of a flexsample/door mode: fixed density, or `base` (default); with
    CUDA-graph replay off (`graph_max_len=0`) for an "unreplayed" mode."""
    config = base
    for key, target in DENSITIES.items():
        if key in mode.split():
            config = fixed_density(target, base)
    if "group" in mode.split():
        config = dataclasses.replace(config, group_estimate=True)
    if mode.endswith(" unreplayed"):
        config = dataclasses.replace(config, graph_max_len=0)
    return config


def load_model(setup: Setup, max_len: int, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if setup.model_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(
            setup.model_dir, dtype=setup.dtype, attn_implementation=attn
        )
        return model.to(setup.device).eval()

    config = LlamaConfig(
        vocab_size=setup.vocab,
        hidden_size=setup.hidden,
        intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.kv_heads,
        rope_theta=500000.0,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # the same weights on every (re)load
    with torch.device(setup.device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=setup.dtype, attn_implementation=attn
        )
    return model.eval()


def copy_v_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention that costs nothing: v `[B, Hkv, S, D]` repeated to the query heads, as
    `[B, S, Hq, D]` (the layout transformers' attention functions return)."""
    groups = query.shape[1] // value.shape[1]
    out = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


def register_copy_v() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(COPY_V, copy_v_attention)
    AttentionMaskInterface.register(COPY_V, _no_mask)  # no S×S mask build for the limit
    return COPY_V


def register_sdpa_causal() -> str:
    """transformers' SDPA function under a mask function that builds no mask: SDPA then runs
    is_causal=True (unpadded, uncached prefill only; what this benchmark runs)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SDPA_CAUSAL, sdpa_attention_forward)
    AttentionMaskInterface.register(SDPA_CAUSAL, _no_mask)
    return SDPA_CAUSAL


class Models:
    """One model whose attention implementation is switched per mode: with
    `set_attn_implementation` where transformers has it (5.x), else by reloading."""

    def __init__(self, setup: Setup, max_len: int):
        self.setup, self.max_len = setup, max_len
        self.model = load_model(setup, max_len)
        self.attn = "sdpa"

    def get(self, attn: str):
        for layer in self.model.model.layers:  # undo a regional compile of an earlier mode
            layer._compiled_call_impl = None
        if attn != self.attn:
            if hasattr(self.model, "set_attn_implementation"):
                self.model.set_attn_implementation(attn)
            else:
                del self.model
                self._empty_cache()
                self.model = load_model(self.setup, self.max_len, attn)
            self.attn = attn
        return self.model

    def _empty_cache(self):
        if self.setup.device == "cuda":
            torch.cuda.empty_cache()


def flexsample_backend(config: SampleConfig, compiler: str):
    """`flexsample.backend(config)` (its SDPA rewrite, then inductor), or the same rewrite
    followed by another dynamo backend (`--compiler aot_eager`: the CPU smoke's shortcut)."""
    if compiler == "inductor":
        return flexsample.backend(config)
    from torch._dynamo.backends.registry import lookup_backend

    from flexsample.compile.rewrite import rewrite_sdpa

    def rewrite_then_compile(gm: torch.fx.GraphModule, example_inputs: list):
        rewrite_sdpa(gm, config)
        return lookup_backend(compiler)(gm, example_inputs)

    return rewrite_then_compile


def build(mode: str, models: Models, compiler: str = "inductor"):
    """(callable, config or None) of a mode; compiled modes are compiled lazily by dynamo,
    with a dynamic sequence length."""
    base = models.setup.base
    if mode == "eager":
        return models.get("sdpa"), None
    if mode == "inductor":
        return torch.compile(models.get("sdpa"), backend=compiler, dynamic=True), None
    if mode == "inductor causal":
        model = models.get(register_sdpa_causal())
        return torch.compile(model, backend=compiler, dynamic=True), None
    if mode == "no-attention":
        model = models.get(register_copy_v())
        return torch.compile(model, backend=compiler, dynamic=True), None
    if mode.startswith("flexsample"):
        config = config_of(mode, base)
        backend = flexsample_backend(config, compiler)
        return torch.compile(models.get("sdpa"), backend=backend, dynamic=True), config
    if mode.startswith("door"):
        from flexsample.integrations.transformers import compile_model, register

        config = config_of(mode, base)
        model = models.get(register(config))  # re-registering replaces the config
        if mode.endswith(" layers"):
            return compile_model(model, config, backend=compiler), config
        return torch.compile(model, backend=compiler, dynamic=True), config
    raise ValueError(f"unknown mode {mode!r}; known: {ALL_MODES}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _prefill(fn, ids) -> None:
    with torch.no_grad():
        fn(input_ids=ids, use_cache=False, logits_to_keep=1)


def _time_prefill(fn, ids, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` later calls), synchronised."""

    def once() -> float:
        _sync(ids.device.type)
        start = time.perf_counter()
        _prefill(fn, ids)
        _sync(ids.device.type)
        return time.perf_counter() - start

    first = once()
    return first, statistics.median(once() for _ in range(repeats))


def _measured_density(setup: Setup, config: SampleConfig, seq_len: int) -> float:
    shape = (1, setup.heads, seq_len, setup.head_dim)
    q = torch.randn(shape, device=setup.device, dtype=setup.dtype)
    k = torch.randn((1, setup.kv_heads, *shape[2:]), device=setup.device, dtype=setup.dtype)
    return density(sample_block_mask(q, k, config)).mean().item()


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def measure_row(args, setup: Setup, mode: str, fn, config, seq_len: int, graphs: dict) -> dict:
    reset_report()
    flexsample.path_counts.clear()
    row: dict = {"S": seq_len, "mode": mode}
    ids = prompt_ids(setup, seq_len)
    before = _unique_graphs()
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        first, median = _time_prefill(fn, ids, args.repeats)
    except torch.OutOfMemoryError as err:
        row["paths"] = f"out of memory: {str(err).splitlines()[0][:80]}"
        return row
    finally:
        del ids
        if setup.device == "cuda":
            torch.cuda.empty_cache()
    row["prefill s"] = median
    row["first call s"] = first
    if mode != "eager":
        row["compile s"] = first - median
        row["graphs compiled"] = _unique_graphs() - before
        graphs[mode] = graphs.get(mode, 0) + row["graphs compiled"]
    if setup.device == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if mode.startswith("flexsample"):
        row["rewritten"] = report().rewritten
    if config is not None:
        row["paths"] = " ".join(f"{k}={v}" for k, v in sorted(flexsample.path_counts.items()))
        probe = torch.empty(
            1, setup.heads, 1, setup.head_dim, device=setup.device, dtype=setup.dtype
        )
        row["flex backend"] = resolve_flex_backend(probe, config) if setup.device == "cuda" else ""
        fixed = any(k in mode.split() for k in DENSITIES)
        row["density"] = _measured_density(setup, config, seq_len) if fixed else "adaptive"
    return row


def derive(rows: list[dict]) -> None:
    """Speedups and the share of the no-attention limit, from the rows of the same length."""
    by_len: dict[int, dict[str, float]] = {}
    for row in rows:
        if "prefill s" in row:
            by_len.setdefault(row["S"], {})[row["mode"]] = row["prefill s"]
    for row in rows:
        times, t = by_len.get(row["S"], {}), row.get("prefill s")
        for key in ("x vs eager SDPA", "x vs fastest dense", "share of limit"):
            row.pop(key, None)
        if t is None:
            continue
        eager, limit = times.get("eager"), times.get("no-attention")
        dense = [times[m] for m in DENSE if m in times]
        if eager is not None:
            row["x vs eager SDPA"] = eager / t
        if dense:
            row["x vs fastest dense"] = min(dense) / t
        if eager is not None and limit is not None and eager != limit:
            row["share of limit"] = (eager - t) / (eager - limit) + 0.0  # no "-0"


# --- profile -----------------------------------------------------------------------------

_COPIES = ("aten::copy_", "aten::contiguous", "aten::clone", "aten::_to_copy")
#: CUDA runtime waits the profiler reports as events (a full launch queue): not device work.
_PROFILER_WAITS = ("Command Buffer Full", "Activity Buffer Request")
_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def part_of(event) -> str:
    """The part of a prefill a profiled CPU op belongs to, by its name, the names of the
    kernels it launched and its flexsample ancestor."""
    ancestors = []
    node = event.cpu_parent
    while node is not None:
        ancestors.append(node.name)
        node = node.cpu_parent
    name = event.name
    if name in _PROFILER_WAITS:
        return "profiler waits"
    inside = "flexsample::sample_attention" in ancestors or name == "flexsample::sample_attention"
    launched = " ".join([name, *(k.name for k in getattr(event, "kernels", []))]).lower()
    if "flexsample::sample_block_scores" in (name, *ancestors):
        return "flexsample::sample_block_scores"
    if "_mismatch_kernel" in launched or "causal_check" in launched:
        return "causal check"
    if "flex_attention" in launched or "tem_fused" in launched or (inside and "flash" in launched):
        return "flex_attention kernels"
    if name in _COPIES or "contiguous" in launched:
        return "copies"
    if inside:
        return "flexsample::sample_attention (rest)"
    if any(s in launched for s in ("scaled_dot_product", "fmha", "flash", "cudnn")):
        return "SDPA (dense attention)"
    if name in _MATMULS or "gemm" in launched or "nvjet" in launched:
        return "matmuls"
    return "everything else"


def profile(fn, setup: Setup, seq_len: int, mode: str) -> tuple[list[dict], list[dict]]:
    """One profiled prefill (after a warm call): top 25 ops by self device time, and parts."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = setup.device == "cuda"
    ids = prompt_ids(setup, seq_len)
    _prefill(fn, ids)  # compile / warm
    _sync(setup.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        _prefill(fn, ids)
        _sync(setup.device)
    del ids

    def self_ms(event) -> float:
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        return us / 1000

    ops: dict[tuple[str, str], list] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        ms = self_ms(event)
        entry = ops.setdefault((part_of(event), event.name), [0.0, 0])
        entry[0] += ms
        entry[1] += 1
    total = sum(ms for ms, _ in ops.values()) or 1.0
    parts: dict[str, float] = {}
    for (part, _), (ms, _) in ops.items():
        parts[part] = parts.get(part, 0.0) + ms
    top = sorted(ops.items(), key=lambda item: -item[1][0])[:25]
    op_rows = [
        {"S": seq_len, "mode": mode, "part": part, "op": name[:80], "device ms": ms, "calls": n}
        for (part, name), (ms, n) in top
    ]
    part_rows = [
        {"S": seq_len, "mode": mode, "part": part, "device ms": ms, "share": ms / total}
        for part, ms in sorted(parts.items(), key=lambda item: -item[1])
    ]
    return op_rows, part_rows


# --- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[32768, 65536, 131072])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--modes", nargs="*", default=MODES, help="of " + ", ".join(ALL_MODES).replace("%", "%%")
    )
    parser.add_argument("--profile", type=int, nargs="*", default=[], metavar="LENGTH")
    parser.add_argument(
        "--model",
        type=pathlib.Path,
        help="a trained checkpoint (bench.train_realtext --out): its weights, prompts from its "
        "held-out documents",
    )
    parser.add_argument("--name", default="ttft")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--append", action="store_true", help="keep earlier rows of --name")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny model on CPU, lengths 64 96 unless given"
    )
    parser.add_argument(
        "--compiler",
        choices=["inductor", "aot_eager"],
        help="dynamo backend after flexsample's rewrite and of the other compiled modes "
        "(default inductor; aot_eager with --cpu-smoke)",
    )
    args = parser.parse_args(argv)
    for mode in args.modes:
        if mode not in ALL_MODES:
            parser.error(f"unknown mode {mode!r}; known: {ALL_MODES}")
    if args.profile and not set(PROFILED) & set(args.modes):
        parser.error(f"--profile profiles {' and '.join(PROFILED)}: give one in --modes")
    if args.model is not None:
        setup = checkpoint_setup(args.model, args.cpu_smoke)
    elif args.cpu_smoke:
        setup = smoke_setup()
    else:
        setup = gpu_setup(args.layers)
    if args.cpu_smoke:
        if args.lengths == parser.get_default("lengths"):
            args.lengths = [64, 96]
        args.repeats = min(args.repeats, 1)
        args.compiler = args.compiler or "aot_eager"
        if args.out == parser.get_default("out"):  # never over the GPU results
            args.out = RESULTS / "cpu"
    args.compiler = args.compiler or "inductor"

    tables = _earlier(args) if args.append else {"TTFT": [], "Profile": [], "Parts": []}
    rows = tables["TTFT"]
    measured = {(length, mode) for length in args.lengths for mode in args.modes}
    rows[:] = [r for r in rows if (r["S"], r["mode"]) not in measured]
    profiled = {(length, mode) for length in args.profile for mode in args.modes}
    for key in ("Profile", "Parts"):
        tables[key] = [r for r in tables[key] if (r["S"], r["mode"]) not in profiled]
    models = Models(setup, max([*args.lengths, *args.profile, 1]))
    graphs: dict[str, int] = {}
    for mode in args.modes:
        torch._dynamo.reset()
        fn, config = build(mode, models, args.compiler)
        for seq_len in args.lengths:
            progress(f"S={seq_len} {mode}: running")
            row = measure_row(args, setup, mode, fn, config, seq_len, graphs)
            rows.append(row)
            progress(
                f"  prefill {row.get('prefill s', float('nan')):.3f}s "
                f"(first call {row.get('first call s', float('nan')):.1f}s, "
                f"{row.get('graphs compiled', 0)} graph(s)) {row.get('paths', '')}"
            )
            _write(args, setup, tables, graphs)
        if mode in PROFILED:
            for seq_len in args.profile:
                progress(f"S={seq_len} {mode}: profiling")
                try:
                    op_rows, part_rows = profile(fn, setup, seq_len, mode)
                except torch.OutOfMemoryError as err:
                    op_rows = [{"S": seq_len, "mode": mode, "op": f"out of memory: {err}"[:80]}]
                    part_rows = []
                tables["Profile"] += op_rows
                tables["Parts"] += part_rows
                _write(args, setup, tables, graphs)
        del fn
        if setup.device == "cuda":
            torch.cuda.empty_cache()
    path = _write(args, setup, tables, graphs)
    print(path.read_text())
    return path


def _earlier(args: argparse.Namespace) -> dict[str, list[dict]]:
    """The tables of an earlier run of `--name` in `--out` (empty ones if there is none)."""
    tables: dict[str, list[dict]] = {"TTFT": [], "Profile": [], "Parts": []}
    path = args.out / f"{args.name}.json"
    if path.exists():
        for table in json.loads(path.read_text())["tables"]:
            key = table["heading"].removeprefix("Profile: ")
            key = {"top 25 ops by device time": "Profile", "per part": "Parts"}.get(key, key)
            tables.setdefault(key, []).extend(table["rows"])
    return tables


def _write(args: argparse.Namespace, setup: Setup, tables: dict, graphs: dict) -> pathlib.Path:
    rows = tables["TTFT"]
    rows.sort(key=lambda r: (r["S"], ALL_MODES.index(r["mode"]) if r["mode"] in ALL_MODES else 99))
    derive(rows)
    shape = (
        (
            f"Model: the trained checkpoint {setup.model_dir} (prompts: its held-out documents, "
            "bench.realtext.eval_documents, joined) "
            if setup.model_dir is not None
            else "Model: random-init Llama-3-8B shape "
        )
        + f"({setup.layers} layers, hidden {setup.hidden}, "
        f"Hq {setup.heads}, Hkv {setup.kv_heads}, D {setup.head_dim}, vocab {setup.vocab}), "
        f"{str(setup.dtype).removeprefix('torch.')} on {setup.device}"
        + (" (--cpu-smoke: sizes, not timings)" if args.cpu_smoke else "")
        + "; transformers attn_implementation='sdpa' as the base."
    )
    notes = [
        shape,
        f"Prefill times are medians of {args.repeats} call(s) after a first call; 'compile s' "
        f"is the first call minus the median. Every compiled mode is compiled ({args.compiler}"
        "; flexsample modes: the SDPA rewrite, then that) once with "
        "dynamic=True after torch._dynamo.reset() and serves the lengths in order.",
        "'graphs compiled': dynamo's counters['stats']['unique_graphs'] added during the row's "
        "calls (graph breaks add graphs too). At the first length of a mode this is the "
        "compile; at a later length any graph is a recompile (goal: 0). This run: "
        + (", ".join(f"{m} {n}" for m, n in graphs.items()) or "none")
        + " graph(s) in all.",
        "'peak GiB': torch.cuda.max_memory_allocated over the row's calls after "
        "reset_peak_memory_stats, weights included (not measured on CPU).",
        "'x vs fastest dense': the fastest of eager and inductor at the length over the mode. "
        "'share of limit': (eager - mode) / (eager - no-attention); 1 = all attention time gone.",
        "no-attention: attention replaced by a copy of v (transformers attention function "
        f"'{COPY_V}', v repeated to the query heads; its mask function returns None, so no "
        f"mask is built), compiled with {args.compiler} and dynamic=True like 'inductor'.",
        "door modes: integrations.transformers.register(config), model switched to "
        "attn_implementation='flexsample' (set_attn_implementation), torch.compile(model, "
        f"dynamic=True) with {args.compiler} ('layers' modes: compile_model, each decoder "
        "layer compiled with dynamic=True, the rest eager): the door's mask function passes "
        "no S×S mask. "
        f"The op replays its sparse path as a CUDA graph up to graph_max_len "
        f"({setup.base.graph_max_len}); 'unreplayed' modes set graph_max_len=0.",
        "Fixed-density configs: "
        + "; ".join(f"{k}: {fixed_density(d, setup.base)}" for k, d in DENSITIES.items())
        + ". Their density is measured on random q/k of the same shape.",
        "'paths' counts sample_attention calls by path over all calls (first + repeats), "
        f"{setup.layers} per forward. "
        + (
            "Default-config rows select on this trained model's attention."
            if setup.model_dir is not None
            else "Default-config rows on random weights keep nearly every block (near-uniform "
            "attention): they measure overhead, not a trained model's benefit."
        ),
        "Profile: one prefill after a warm call under torch.profiler ("
        + (
            "CPU and CUDA activities; 'device ms' is self CUDA time"
            if setup.device == "cuda"
            else "CPU activities only; 'device ms' is self CPU time"
        )
        + "), attributed to the CPU op that launched it; 'part' groups ops by name and by "
        "their flexsample ancestor (sample_block_scores, sample_attention).",
    ]
    out = [("TTFT", COLUMNS, rows)]
    if tables["Profile"]:
        out += [
            ("Profile: top 25 ops by device time", PROFILE_COLUMNS, tables["Profile"]),
            ("Profile: per part", PART_COLUMNS, tables["Parts"]),
        ]
    return write_results(args.name, "Time to first token", out, notes, out_dir=args.out)


if __name__ == "__main__":
    main()
