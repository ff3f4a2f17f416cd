"""Needle in a haystack for any local transformers causal-LM checkpoint with a tokenizer.

For each context length x needle depth x sample: a prompt from `bench.retrieval.niah_prompt`
(generated filler, one needle "the pass key of <key>: <value> .", the question at the end),
greedy decoding of up to `--max-new-tokens`, exact match of the first number generated. The
prefill (where attention is sparse) runs through each method; the decode steps continue from
its KV cache with the eager model. Methods:
- `dense`: attn_implementation="sdpa";
- `compile`: `torch.compile(model, backend=flexsample.backend(config), dynamic=True)`;
- `attn`: attn_implementation="flexsample" (`flexsample.integrations.transformers`);
- `window-sink`: window + sink blocks (`flexsample.baselines.window_sink`) at flexsample's
  density, measured per call and head on the same q/k (an attention function defined here).
Models are loaded with `from_pretrained` (per method: the attention function is a load-time
choice). Writes bench/results/<name>.{md,json} and <name>.png (accuracy heat maps, depth x
length, one per method; `bench.plot` draws them where matplotlib is installed).
`python -m bench.niah --model PATH`; our own model comes from `bench/train_retrieval.py`.
"""

from __future__ import annotations

import argparse
import inspect
import pathlib
import re
import sys

import torch

import flexsample
from bench.harness import RESULTS, add_config_overrides, progress, write_results
from bench.retrieval import niah_prompt
from flexsample import SampleConfig, sample_block_mask
from flexsample.attention import attention_with_mask
from flexsample.baselines import window_sink
from flexsample.block_mask import keep_block_mask
from flexsample.compile import report, reset_report
from flexsample.metrics import density

METHODS = ("dense", "compile", "attn", "window-sink")
COLUMNS = ["method", "S", "depth", "samples", "accuracy", "density", "sparse calls", "rewritten"]
SUMMARY_COLUMNS = [
    "method",
    "S",
    "samples",
    "accuracy",
    "vs dense (points)",
    "density",
    "sparse calls",
]


class DensityLog:
    """Densities of the masks built in the prefill calls of one prompt (mean over heads)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def mean(self) -> float | str:
        return sum(self.values) / len(self.values) if self.values else "dense"


def _sparse_applies(module, query, key, value, mask, dropout, config, kwargs) -> bool:
    """Whether the package's attention function takes the sparse path for this call."""
    from flexsample.integrations.transformers import door_reason

    kwargs = dict(kwargs)
    is_causal = kwargs.pop("is_causal", None)
    return door_reason(module, query, key, value, mask, dropout, is_causal, kwargs, config) is None


def recording_flexsample(config: SampleConfig, log: DensityLog):
    """The package's attention function, logging the density of the mask it builds."""
    from flexsample.integrations.transformers import make_attention_forward

    inner = make_attention_forward(config)

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        if _sparse_applies(module, query, key, value, attention_mask, dropout, config, kw):
            log.values.append(
                density(sample_block_mask(query, key, config, scale=scaling)).mean().item()
            )
        return inner(module, query, key, value, attention_mask, dropout, scaling, **kw)

    return forward


def window_sink_attention(config: SampleConfig, log: DensityLog):
    """Window + sink at flexsample's per-head density on the same q/k; dense SDPA wherever
    flexsample would be dense (short prompts, decode steps, padding masks)."""
    return baseline_attention(
        config, log, lambda query, key, target, scale: window_sink(target, query.shape[2], config)
    )


def baseline_attention(config: SampleConfig, log: DensityLog, choose):
    """An attention function running the block mask `choose(query, key, target, scale)`
    returns (keep `[B, Hq, nQ, nKV]`; target `[B, Hq]` is flexsample's per-head density on the
    same q/k, which `log` records); dense SDPA wherever flexsample would be dense."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        if not _sparse_applies(module, query, key, value, attention_mask, dropout, config, kw):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw
            )
        seq_len = query.shape[2]
        target = density(sample_block_mask(query, key, config, scale=scaling))
        keep = choose(query, key, target, scaling)
        log.values.append(target.mean().item())
        out = attention_with_mask(
            query,
            key,
            value,
            keep_block_mask(keep, seq_len, config),
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None

    return forward


def load(path: str, method: str, config: SampleConfig, log: DensityLog, device, dtype):
    """(prefill callable, eager model) for `method`, loaded with from_pretrained."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    attn = "sdpa"
    if method in ("attn", "window-sink"):
        attn = f"niah-{method}"
        make = recording_flexsample if method == "attn" else window_sink_attention
        AttentionInterface.register(attn, make(config, log))
        AttentionMaskInterface.register(attn, sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    model = model.to(device).eval()
    if method == "compile":
        torch._dynamo.reset()
        return torch.compile(model, backend=flexsample.backend(config), dynamic=True), model
    return model, model


@torch.no_grad()
def greedy(prefill, model, ids: torch.Tensor, max_new_tokens: int, eos: int | None) -> list[int]:
    """Greedy tokens after `ids` `[1, S]`: the prefill through `prefill`, then decode steps
    with `model` on the returned cache."""
    # transformers renamed `past_key_values` to `cache` (argument and output) after 5.17.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = prefill(input_ids=ids, use_cache=True, logits_to_keep=1)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(max_new_tokens - 1):
        if tokens[-1] == eos:
            break
        step = torch.tensor([[tokens[-1]]], device=ids.device)
        out = model(input_ids=step, use_cache=True, **{name: getattr(out, name)})
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def answer_of(text: str) -> str | None:
    """The first number in the generated text."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local checkpoint directory")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 12288, 16384])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--samples", type=int, default=10, help="prompts per (length, depth)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--min-seq-len",
        type=int,
        default=None,
        help="override SampleConfig.min_seq_len (default: the package's)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="override SampleConfig.alpha (default: the package's)",
    )
    add_config_overrides(parser, "--set estimator=stripes --set alpha=0.95")
    parser.add_argument("--name", default="niah")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from flexsample.integrations.transformers import register

    register()  # the "flexsample" name, for users of this checkpoint; `attn` logs densities
    overrides = {"min_seq_len": args.min_seq_len, "alpha": args.alpha}
    overrides = {k: v for k, v in overrides.items() if v is not None} | dict(args.set)
    config = SampleConfig(**overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows: list[dict] = []
    cells = len(args.lengths) * len(args.depths) * args.samples
    for method in args.methods:
        log = DensityLog()
        prefill, model = load(args.model, method, config, log, device, dtype)
        reset_report()
        done = 0
        for length in args.lengths:
            for depth in args.depths:
                flexsample.path_counts.clear()
                log.values.clear()
                hits = 0
                for i in range(args.samples):
                    ids, answer = niah_prompt(tokenizer, length, depth, seed=i)
                    tokens = greedy(
                        prefill,
                        model,
                        torch.tensor([ids], device=device),
                        args.max_new_tokens,
                        tokenizer.eos_token_id,
                    )
                    hits += answer_of(tokenizer.decode(tokens)) == answer
                    done += 1
                    print(
                        f"\r{method}: {done}/{cells} prompts", end="", file=sys.stderr, flush=True
                    )
                sparse_calls = flexsample.path_counts.get("sparse", 0)
                # The compiled graph's masks are not observable from here.
                unlogged = method == "compile" and sparse_calls
                rows.append(
                    {
                        "method": method,
                        "S": length,
                        "depth": depth,
                        "samples": args.samples,
                        "accuracy": hits / args.samples,
                        "density": "n/a" if unlogged else log.mean(),
                        "sparse calls": sparse_calls,
                        "rewritten": report().rewritten if method == "compile" else "",
                    }
                )
        progress("")
        del prefill, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = _summary(rows, args.methods, args.lengths)
    for row in summary:
        progress(f"{row['method']:<12} S={row['S']:<6} accuracy {row['accuracy']:.3f}")
    notes = [
        f"Checkpoint: {args.model}; dtype {dtype}; {args.samples} prompts per cell (seeds "
        f"0..{args.samples - 1}), greedy, up to {args.max_new_tokens} new tokens, exact match "
        "of the first number generated.",
        f"flexsample config: {config}. The sparse path runs only for prompts of at least "
        f"min_seq_len={config.min_seq_len} tokens; shorter ones run dense SDPA in every method.",
        "density: mean over the prefill's sparse calls and heads of flexsample's mask density "
        "(for window-sink: the density it was matched to); 'dense' where no call was sparse; "
        "'n/a' for compile, whose masks inside the compiled graph are not logged (it builds "
        "them from the same q/k and config as attn). "
        "'sparse calls' counts sample_attention calls that took the sparse path (compile "
        "method); 'rewritten' is the number of SDPA calls the compiler pass rewrote, summed over "
        "the method's compiles so far (dynamic=True; a new length can recompile).",
        "window-sink: key block 0 plus the nearest block diagonals, per head the smallest such "
        "mask at or above flexsample's density on the same q/k.",
    ]
    out_dir = pathlib.Path(args.out_dir)
    tables = [
        ("Accuracy by length", SUMMARY_COLUMNS, summary),
        ("By length and depth", COLUMNS, rows),
    ]
    path = write_results(args.name, "Needle in a haystack", tables, notes, out_dir)
    print(open(path).read())
    try:
        from bench.plot import niah as heat_maps
    except ImportError:  # matplotlib: the GPU machine has none; plot the JSON elsewhere
        progress(f"no matplotlib: draw the heat maps with `python -m bench.plot {args.name}`")
    else:
        progress(f"heat maps: {heat_maps(out_dir, args.name)}")


def _summary(rows: list[dict], methods: list[str], lengths: list[int]) -> list[dict]:
    out = []
    for method in methods:
        for length in lengths:
            cell = [r for r in rows if r["method"] == method and r["S"] == length]
            dense = [r for r in rows if r["method"] == "dense" and r["S"] == length]
            samples = sum(r["samples"] for r in cell)
            acc = sum(r["accuracy"] * r["samples"] for r in cell) / samples
            row = {
                "method": method,
                "S": length,
                "samples": samples,
                "accuracy": acc,
                "sparse calls": sum(r["sparse calls"] for r in cell),
            }
            densities = [r["density"] for r in cell if isinstance(r["density"], float)]
            row["density"] = (
                sum(densities) / len(densities)
                if densities
                else cell[0]["density"]
                if cell
                else "dense"
            )
            if dense:
                dense_acc = sum(r["accuracy"] * r["samples"] for r in dense) / sum(
                    r["samples"] for r in dense
                )
                row["vs dense (points)"] = 100 * (acc - dense_acc)
            out.append(row)
    return out


if __name__ == "__main__":
    main()
