"""Real-text judge: perplexity of a code model on held-out packages under every masking method.

The model (`bench/train_realtext.py`, or any checkpoint with a `corpus.json` beside it) reads
held-out documents (`bench.corpus` eval split: whole packages never trained on), each cut to
`--length` tokens (16K; 8K / 32K by flag). Per method and document: the mean loss of the last
`--last` (2K) tokens given the full context, and of all tokens; perplexity = exp(mean over
documents), and the ratio to dense with a standard error from the per-document paired
differences (ratio = exp(mean d), SE = ratio * sd(d) / sqrt(n), d = loss - dense loss).
Methods (each a per-layer attention function of the same weights):
- `dense`: SDPA; `dense nearest 4K`: each of the last 2K tokens sees only the nearest
  `--near` (4K) to near + `--near-chunk` tokens (shows whether the model uses long context);
- `flexsample attn`: `flexsample.integrations.transformers.register()` +
  attn_implementation="flexsample"; `flexsample compile`: `torch.compile(model,
  backend=flexsample.backend(config))` (default on CUDA; `--compile/--no-compile`);
- `flexsample a=<alpha>`: the default config's alpha sweep (`--alphas`);
- `stripes a=<alpha>`: SampleAttention's published selection (`estimator="stripes"`,
  `--stripes-alphas`), and `stripes a=<alpha> tile_alpha=<t>` with the CRA rule over
  sampled tiles (`--tile-alphas`, `SampleConfig.tile_alpha`);
- `flexsample antidiag <cell> a=<alpha> s=<stride>`: the antidiagonal estimator
  (`SampleConfig(estimator="antidiagonal")`, ALGORITHM §9) at each of `--cell-scores`,
  `--antidiagonal-alphas` and `--strides`; in the layer table each also gets the block
  oracle at its per-head density;
- at flexsample's per-head density on the same q/k: window + sink, vertical-slash, the
  column oracle and the block oracle (`flexsample.baselines`); the block oracle also at
  fixed densities (`--oracle-densities`).
Then, from the dense model's own post-RoPE q/k of one document (captured per layer): per
layer, density, true CRA and output error of flexsample and each baseline at its density
(`bench.accuracy.evaluate`); a few layers' q/k/v are saved (`--qkv-out`) for
`python -m bench.accuracy --qkv PATH`.
Writes bench/results/realtext.{json,md} and realtext.png (matplotlib, where installed).

GPU, train then evaluate (one command, < 10 min): `python -m bench.realtext --train`;
evaluate a checkpoint: `python -m bench.realtext --model DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

import flexsample
from bench import train_realtext
from bench.accuracy import evaluate as mask_accuracy
from bench.corpus import CorpusConfig, build_corpus
from bench.harness import (
    RESULTS,
    add_antidiagonal_arguments,
    antidiagonal_configs,
    progress,
    write_results,
)
from bench.niah import DensityLog, baseline_attention, recording_flexsample
from flexsample import SampleConfig, sample_block_mask
from flexsample.baselines import (
    column_mass,
    oracle_blocks,
    oracle_columns,
    vertical_slash,
    window_sink,
)
from flexsample.block_mask import kept_blocks
from flexsample.metrics import block_density, block_mass, density

SWITCH_NAME = "realtext"
PPL_COLUMNS = [
    "method",
    "density",
    "ppl last",
    "ratio",
    "ratio SE",
    "ppl all",
    "ratio all",
    "ratio all SE",
    "docs",
    "sparse calls",
    "seconds",
]
LAYER_COLUMNS = [
    "layer",
    "method",
    "density",
    "density min head",
    "density max head",
    "CRA mean",
    "CRA worst head",
    "CRA p1",
    "err max",
    "err mean",
]
BASELINES = ("window+sink", "vertical-slash", "oracle columns", "oracle blocks")


class Switch:
    """The attention function behind attn_implementation="realtext": `fn` (a transformers
    attention function), and optionally a capture of every layer's post-RoPE q/k/v."""

    def __init__(self) -> None:
        self.fn = None
        self.capture: dict[int, tuple[torch.Tensor, ...]] | None = None

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        if self.capture is not None:
            self.capture[module.layer_idx] = (query.detach(), key.detach(), value.detach())
        return self.fn(module, query, key, value, attention_mask, *args, **kwargs)


SWITCH = Switch()


def register_switch() -> str:
    """Register `SWITCH` (with SDPA's mask format) as attn_implementation="realtext"."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SWITCH_NAME, SWITCH)
    AttentionMaskInterface.register(SWITCH_NAME, sdpa_mask)
    return SWITCH_NAME


def eval_documents(
    model_dir: pathlib.Path, tokenizer, length: int | None, count: int | None, tiny: bool = False
) -> tuple[list[np.ndarray], list[str], dict]:
    """The first `count` held-out documents (in hash order, as the corpus caps them) with at
    least `length` tokens, cut to `length`: (ids, names, corpus record of this machine).
    None: every document, whole (the TTFT benchmark joins them into long prompts).
    The corpus caps come from the checkpoint's corpus.json, so the eval split is the one the
    model was trained without."""
    saved = model_dir / "corpus.json"
    trained = json.loads(saved.read_text()) if saved.exists() else None
    if trained is not None:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in trained["config"].items()}
        config = CorpusConfig(**fields)
    else:
        config = CorpusConfig()
    corpus = build_corpus(config)
    record = corpus.record()
    if trained is not None and trained["eval_packages"] != record["eval_packages"]:
        raise ValueError(
            f"eval packages {record['eval_packages']} differ from the training "
            f"run's {trained['eval_packages']}: not held out"
        )
    record["matches_training_corpus"] = (
        trained is not None and trained["file_list_sha256"] == record["file_list_sha256"]
    )
    ids = train_realtext.encode(tokenizer, corpus.texts("eval"))
    order = sorted(range(len(ids)), key=lambda i: _hash(corpus.eval[i].name))
    chosen = [i for i in order if len(ids[i]) >= (length or 0)][:count]
    if not chosen:
        raise ValueError(f"no held-out document has {length} tokens")
    record["eval_lengths_tokens"] = sorted(int(len(x)) for x in ids)
    return [ids[i][:length] for i in chosen], [corpus.eval[i].name for i in chosen], record


def _hash(name: str) -> str:
    import hashlib

    return hashlib.sha1(name.encode()).hexdigest()


@torch.no_grad()
def token_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token losses `[S-1]` (float32) of ids `[1, S]`."""
    logits = model(input_ids=ids).logits[0, :-1]
    return F.cross_entropy(logits.float(), ids[0, 1:], reduction="none")


@torch.no_grad()
def nearest_losses(model, ids: torch.Tensor, last: int, near: int, chunk: int) -> torch.Tensor:
    """Losses `[last]` of the last `last` tokens, each predicted from only the `near` to
    `near + chunk` tokens before it: chunks of `chunk` targets, each a fresh forward pass."""
    length = ids.shape[1]
    if near + last > length:
        raise ValueError(f"near={near} + last={last} exceeds the length {length}")
    out = []
    for start in range(length - last, length, chunk):
        end = min(start + chunk, length)
        window = ids[:, start - near : end]
        out.append(token_losses(model, window)[near - 1 :])
    return torch.cat(out)


def load(model_dir: pathlib.Path, attn: str, device, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def summarize(method: str, losses: dict, dense: dict | None, extra: dict) -> dict:
    """A table row: perplexities and paired ratios vs dense (per-document losses `[n]`)."""
    row = {"method": method, **extra}
    for key, suffix in (("last", ""), ("all", " all")):
        if key not in losses:
            continue
        mine = np.asarray(losses[key], dtype=np.float64)
        row[f"ppl {key}"] = float(np.exp(mine.mean()))
        if dense is not None and key in dense:
            diff = mine - np.asarray(dense[key], dtype=np.float64)
            ratio = float(np.exp(diff.mean()))
            se = ratio * float(diff.std(ddof=1)) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
            row[f"ratio{suffix}"], row[f"ratio{suffix} SE"] = ratio, se
    row["docs"] = len(losses["last"])
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: --out)")
    parser.add_argument(
        "--train",
        action="store_true",
        help="train the model first (bench.train_realtext flags apply)",
    )
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--last", type=int, default=2048, help="scored tail, tokens")
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--near", type=int, default=4096, help="nearest-context baseline")
    parser.add_argument("--near-chunk", type=int, default=512)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.98, 0.99])
    parser.add_argument(
        "--stripes-alphas",
        type=float,
        nargs="+",
        default=[0.95],
        help="alphas of estimator='stripes' rows (SampleAttention's selection; paper: 0.95)",
    )
    parser.add_argument(
        "--tile-alphas",
        type=float,
        nargs="*",
        default=[0.5, 0.8, 0.9],
        help="SampleConfig.tile_alpha values of stripes rows at the first --stripes-alphas",
    )
    add_antidiagonal_arguments(parser, strides=[8, 16], alphas=[0.5, 0.7, 0.9])
    parser.add_argument(
        "--local-blocks",
        type=int,
        default=None,
        help="SampleConfig.local_blocks of the antidiagonal rows (default: the config's)",
    )
    parser.add_argument("--oracle-densities", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the torch.compile door (default: on with CUDA)",
    )
    parser.add_argument(
        "--min-seq-len",
        type=int,
        default=None,
        help="override SampleConfig.min_seq_len (tiny tests)",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=None,
        help="override SampleConfig q_block = kv_block (tiny tests)",
    )
    parser.add_argument(
        "--capture-rows",
        type=int,
        default=4096,
        help="true CRA over this many evenly spaced rows (all rows if S is less)",
    )
    parser.add_argument(
        "--qkv-out", default=None, help="captured q/k/v file (default: <model>/qkv.pt)"
    )
    parser.add_argument(
        "--qkv-layers",
        type=int,
        nargs="+",
        default=None,
        help="layers to save (default: first, middle, last)",
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=4.0,
        help="skip the remaining methods once the evaluation took this long",
    )
    parser.add_argument("--name", default="realtext")
    parser.add_argument("--out-dir", default=None, help="results directory")
    train_realtext.add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> pathlib.Path:
    """Evaluate (after training with --train); returns the results .md path."""
    from transformers import AutoTokenizer

    from flexsample.compile import report, reset_report
    from flexsample.integrations.transformers import register

    args = parse_args(argv)
    wall = time.perf_counter()
    if args.train:
        skip = {
            "model",
            "train",
            "length",
            "last",
            "docs",
            "near",
            "near_chunk",
            "alphas",
            "oracle_densities",
            "compile",
            "min_seq_len",
            "block",
            "capture_rows",
            "qkv_out",
            "qkv_layers",
            "tile_alphas",
            "stripes_alphas",
            "antidiagonal_alphas",
            "strides",
            "cell_scores",
            "row_thresholds",
            "local_blocks",
            "budget_minutes",
            "name",
            "out_dir",
        }
        train_argv = []
        for key, value in vars(args).items():
            if key in skip or value is None or value is False:
                continue
            flag = "--" + key.replace("_", "-")
            if value is True:
                train_argv.append(flag)
            else:
                train_argv += [flag, *map(str, value if isinstance(value, list) else [value])]
        train_realtext.main(train_argv)
    model_dir = pathlib.Path(args.model or args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    overrides = {"min_seq_len": args.min_seq_len}
    if args.block is not None:
        overrides.update(q_block=args.block, kv_block=args.block)
    config = SampleConfig(**{k: v for k, v in overrides.items() if v is not None})
    out_dir = (
        pathlib.Path(args.out_dir)
        if args.out_dir
        else (RESULTS / "cpu" if device.type == "cpu" else RESULTS)
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs, names, record = eval_documents(model_dir, tokenizer, args.length, args.docs)
    progress(f"{len(docs)} held-out documents of {args.length} tokens: {names[:4]}...")
    inputs = [torch.from_numpy(d.astype(np.int64))[None].to(device) for d in docs]
    register(config)  # attn_implementation="flexsample", the package's own door
    switch = register_switch()
    eval_start = time.perf_counter()
    rows: list[dict] = []
    skipped: list[str] = []
    losses_of: dict[str, dict] = {}

    def run(
        method: str,
        model,
        *,
        attn_fn=None,
        log: DensityLog | None = None,
        near: bool = False,
        density_of: str | None = None,
    ) -> None:
        if time.perf_counter() - eval_start > args.budget_minutes * 60:
            skipped.append(method)
            progress(f"{method}: skipped (evaluation budget spent)")
            return
        SWITCH.fn = attn_fn
        flexsample.path_counts.clear()
        start = time.perf_counter()
        last, every = [], []
        for ids in inputs:
            if near:
                last.append(
                    nearest_losses(model, ids, args.last, args.near, args.near_chunk).mean().item()
                )
            else:
                nll = token_losses(model, ids)
                last.append(nll[-args.last :].mean().item())
                every.append(nll.mean().item())
        seconds = time.perf_counter() - start
        losses = {"last": last} if near else {"last": last, "all": every}
        losses_of[method] = losses
        extra = {"seconds": seconds, "sparse calls": flexsample.path_counts.get("sparse", 0)}
        if log is not None:
            extra["density"] = log.mean()
        elif density_of is not None:
            extra["density"] = next(
                (r["density"] for r in rows if r["method"] == density_of), "n/a"
            )
        else:
            extra["density"] = 1.0 if method == "dense" else "n/a"
        row = summarize(method, losses, losses_of.get("dense"), extra)
        rows.append(row)
        progress(
            f"{method:<28} ppl last {row['ppl last']:.4f} ratio {row.get('ratio', 1):.4f}"
            f" ± {row.get('ratio SE', 0):.4f} density {row['density']} {seconds:.1f}s"
        )
        write()

    def write() -> pathlib.Path:
        notes = [
            f"Checkpoint: {model_dir}; {dtype}; {len(docs)} held-out documents of {args.length} "
            f"tokens (the first {args.length} of each; names {names}); 'ppl last' over the "
            f"last {args.last} tokens of each, 'ppl all' over every token.",
            "ratio = exp(mean over documents of (loss - dense loss)), SE = ratio * sd / sqrt(n) "
            "of those per-document paired differences.",
            f"dense nearest {args.near}: each of the last {args.last} tokens predicted from "
            f"only the {args.near}..{args.near + args.near_chunk} tokens before it (fresh "
            "forward passes on the truncated context); dense uses the full context.",
            f"flexsample config: {config}. 'flexsample antidiag c a=x s=y r=r' is that config with "
            "estimator='antidiagonal', cell_score=c, alpha=x, stride=y, row_threshold=r "
            "(and dense_tail=t where the name ends in t=t)"
            + ("" if args.local_blocks is None else f", local_blocks={args.local_blocks}")
            + " (ALGORITHM §9); in the layer table 'oracle blocks @antidiag c a=x s=y r=r' is the "
            "block oracle at its per-head density. 'flexsample attn' (attn_implementation="
            "\"flexsample\") and 'flexsample compile' (torch.compile backend) carry the density "
            "of the alpha sweep's row at that alpha (same function on the same inputs).",
            "density: kept share of the causal area, mean over the sparse calls (layers x docs) "
            "and heads; baselines '@flexsample' are matched per call and head to flexsample's "
            "density on the same q/k (the smallest mask of their pattern at or above it); the "
            "block oracle keeps the diagonal blocks plus the blocks of largest exact attention "
            "mass; 'oracle blocks d=x' at a fixed density x in every head.",
            f"Layer table: the dense model's post-RoPE q/k/v of document {names[0]}, per layer; "
            f"true CRA over {args.capture_rows} evenly spaced rows (all rows when S is less), "
            "err = ||out - dense|| / ||dense|| per head (bench.accuracy.evaluate).",
            f"Corpus: {json.dumps({k: v for k, v in record.items() if k != 'packages'})}.",
            f"Packages: {json.dumps(record['packages'])}.",
        ]
        if skipped:
            notes.append(f"Skipped (evaluation budget {args.budget_minutes} min): {skipped}.")
        tables = [
            ("Perplexity by method", PPL_COLUMNS, rows),
            ("Per layer, from the model's own q/k", LAYER_COLUMNS, layer_rows),
        ]
        return write_results(
            args.name, "Real-text judge: perplexity under each mask", tables, notes, out_dir
        )

    layer_rows: list[dict] = []
    model = load(model_dir, switch, device, dtype)
    sdpa = _sdpa_forward()
    run("dense", model, attn_fn=sdpa)
    run(
        f"dense nearest {args.near // 1024}K"
        if args.near >= 1024
        else f"dense nearest {args.near}",
        model,
        attn_fn=sdpa,
        near=True,
    )
    default_alpha = config.alpha
    for alpha in sorted(set(args.alphas) | {default_alpha}):
        cfg = dataclasses.replace(config, alpha=alpha)
        log = DensityLog()
        run(f"flexsample a={alpha}", model, attn_fn=recording_flexsample(cfg, log), log=log)
    for name, cfg in stripes_configs(config, args).items():
        log = DensityLog()
        run(name, model, attn_fn=recording_flexsample(cfg, log), log=log)
    for name, cfg in antidiagonal_configs(config, args, "flexsample antidiag").items():
        log = DensityLog()
        run(name, model, attn_fn=recording_flexsample(cfg, log), log=log)
    default_row = f"flexsample a={default_alpha}"
    door = load(model_dir, "flexsample", device, dtype)
    run("flexsample attn", door, density_of=default_row)
    del door
    baselines = {
        "window+sink": lambda q, k, t, s: window_sink(t, q.shape[2], config),
        "vertical-slash": lambda q, k, t, s: vertical_slash(q, k, t, config, s),
        "oracle columns": lambda q, k, t, s: oracle_columns(q, k, t, config, s),
        "oracle blocks": lambda q, k, t, s: oracle_blocks(q, k, t, config, s),
    }
    for name, choose in baselines.items():
        log = DensityLog()
        run(f"{name} @flexsample", model, attn_fn=baseline_attention(config, log, choose), log=log)
    for fixed in args.oracle_densities:
        actual = DensityLog()  # the oracle's own density (>= fixed: whole blocks)

        def choose(q, k, t, s, fixed=fixed, actual=actual):
            keep = oracle_blocks(q, k, torch.full_like(t, fixed), config, s)
            actual.values.append(
                block_density(keep, q.shape[2], q.shape[2], config.q_block, config.kv_block)
                .mean()
                .item()
            )
            return keep

        forward = baseline_attention(config, DensityLog(), choose)
        run(f"oracle blocks d={fixed}", model, attn_fn=forward, log=actual)
    if use_compile:
        torch._dynamo.reset()
        reset_report()
        compiled = torch.compile(
            load(model_dir, "sdpa", device, dtype), backend=flexsample.backend(config)
        )
        run("flexsample compile", compiled, density_of=default_row)
        if rows[-1]["method"] == "flexsample compile":
            rows[-1]["rewritten"] = report().rewritten
        del compiled

    layer_rows += layer_study(model, inputs[0], config, args, model_dir)
    SWITCH.fn = None
    path = write()
    progress(
        f"evaluation {time.perf_counter() - eval_start:.0f}s, all {time.perf_counter() - wall:.0f}s"
    )
    print(path.read_text())
    try:
        from bench.plot import realtext as plot
    except ImportError:
        progress(f"no matplotlib: plot with `python -m bench.plot {args.name}`")
    else:
        progress(f"plot: {plot(out_dir, args.name)}")
    return path


def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def stripes_configs(config: SampleConfig, args) -> dict[str, SampleConfig]:
    """SampleAttention's own selection (estimator="stripes") by row name: each of
    `--stripes-alphas`, and each of `--tile-alphas` at the first of them."""
    base = dataclasses.replace(config, estimator="stripes")
    rows = {f"stripes a={a}": dataclasses.replace(base, alpha=a) for a in args.stripes_alphas}
    for tile_alpha in args.tile_alphas:
        cfg = dataclasses.replace(base, alpha=args.stripes_alphas[0], tile_alpha=tile_alpha)
        rows[f"stripes a={cfg.alpha} tile_alpha={tile_alpha}"] = cfg
    return rows


@torch.no_grad()
def capture_qkv(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, ...]]:
    """Every layer's post-RoPE (q `[1, Hq, S, D]`, k, v `[1, Hkv, S, D]`) on a dense pass."""
    SWITCH.fn, SWITCH.capture = _sdpa_forward(), {}
    try:
        model(input_ids=ids, logits_to_keep=1)
        return SWITCH.capture
    finally:
        SWITCH.capture = None


def layer_study(model, ids: torch.Tensor, config: SampleConfig, args, model_dir) -> list[dict]:
    """Per layer: flexsample's mask and each baseline at its density on the captured q/k:
    density, true CRA, output error. Saves a few layers' q/k/v for bench.accuracy --qkv."""
    captured = capture_qkv(model, ids)
    seq_len = ids.shape[1]
    rows = None
    if seq_len > args.capture_rows:
        rows = torch.linspace(0, seq_len - 1, args.capture_rows, device=ids.device).long()
    out = []
    for layer in sorted(captured):
        q, k, v = captured[layer]
        x = types.SimpleNamespace(q=q, k=k, v=v)
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        block_mask = sample_block_mask(q, k, config)
        target = density(block_mask)
        mass = block_mass(q, k, config)
        keeps = {
            "flexsample": kept_blocks(block_mask),
            "window+sink": window_sink(target, seq_len, config),
            "vertical-slash": vertical_slash(q, k, target, config),
            "oracle columns": oracle_columns(q, k, target, config, mass=column_mass(q, k, config)),
            "oracle blocks": oracle_blocks(q, k, target, config, mass=mass),
        }
        for name, cfg in stripes_configs(config, args).items():
            keeps[name] = kept_blocks(sample_block_mask(q, k, cfg))
        for name, cfg in antidiagonal_configs(config, args, "flexsample antidiag").items():
            antidiag = sample_block_mask(q, k, cfg)
            keeps[name] = kept_blocks(antidiag)
            oracle = oracle_blocks(q, k, density(antidiag), config, mass=mass)
            keeps[f"oracle blocks @{name.removeprefix('flexsample ')}"] = oracle
        for method, keep in keeps.items():
            per_head = block_density(keep, seq_len, seq_len, config.q_block, config.kv_block)
            out.append(
                {
                    "layer": layer,
                    "method": method,
                    **mask_accuracy(x, keep, dense, config, rows),
                    "density min head": per_head.min().item(),
                    "density max head": per_head.max().item(),
                }
            )
            progress(
                f"layer {layer} {method:<26} density {out[-1]['density']:.3f} CRA "
                f"{out[-1]['CRA mean']:.4f} worst {out[-1]['CRA worst head']:.4f} err "
                f"{out[-1]['err mean']:.4f}"
            )
    layers = sorted(captured)
    chosen = args.qkv_layers or sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    save_dtype = torch.bfloat16 if ids.is_cuda else torch.float16
    path = pathlib.Path(args.qkv_out) if args.qkv_out else model_dir / "qkv.pt"
    torch.save(
        {
            "layers": chosen,
            "source": str(model_dir),
            **{
                name: [captured[i][j].to(save_dtype).cpu() for i in chosen]
                for j, name in enumerate("qkv")
            },
        },
        path,
    )
    progress(f"q/k/v of layers {chosen} saved to {path}")
    return out


if __name__ == "__main__":
    main()
