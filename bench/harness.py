"""One harness for every benchmark: environment facts, timing, and results as data + table.

Each script builds rows (dicts), and `write_results` writes `bench/results/<name>.json` (the
data) and `<name>.md` (environment, command, table, notes); `plot.py` draws PNGs from the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from flexsample import SampleConfig

RESULTS = pathlib.Path(__file__).parent / "results"


def environment() -> dict[str, str]:
    """GPU, driver, library versions, date and the exact command."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in sys.orig_argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = "unknown"
    else:
        env["gpu"] = f"none (CPU: {platform.processor() or platform.machine()})"
    return env


def add_antidiagonal_arguments(parser, *, strides: list[int], alphas: list[float]) -> None:
    """`--strides` and `--antidiagonal-alphas`: the antidiagonal estimator's rows of a benchmark
    (`SampleConfig(estimator="antidiagonal")`, ALGORITHM §9); none with `--strides` alone."""
    parser.add_argument(
        "--strides", type=int, nargs="*", default=strides, help="SampleConfig.stride values"
    )
    parser.add_argument(
        "--antidiagonal-alphas",
        type=float,
        nargs="+",
        default=alphas,
        help="alphas of the antidiagonal estimator",
    )
    parser.add_argument(
        "--cell-scores",
        nargs="+",
        choices=["max", "mean"],
        default=["max"],
        help="SampleConfig.cell_score values of the antidiagonal rows",
    )
    parser.add_argument(
        "--row-thresholds",
        type=_optional_float,
        nargs="+",
        default=[SampleConfig.row_threshold],
        help="SampleConfig.row_threshold values of the antidiagonal rows ('none': off)",
    )
    parser.add_argument(
        "--dense-tails",
        type=int,
        nargs="+",
        default=[SampleConfig.dense_tail],
        help="SampleConfig.dense_tail values of the antidiagonal rows",
    )
    parser.add_argument(
        "--estimate-fp8",
        choices=["off", "on"],
        nargs="+",
        default=["off"],
        help="SampleConfig.estimate_fp8 of the antidiagonal rows ('on' rows end in ' fp8')",
    )
    parser.add_argument(
        "--group-estimate",
        choices=["off", "on"],
        nargs="+",
        default=["off"],
        help="SampleConfig.group_estimate of the antidiagonal rows ('on' rows end in ' grp')",
    )


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def add_config_overrides(parser, example: str) -> None:
    """`--set FIELD=VALUE` (repeatable; `args.set`: (field, value) pairs of SampleConfig)."""
    parser.add_argument(
        "--set",
        type=config_override,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=f"override a SampleConfig field (repeatable), e.g. {example}",
    )


def config_override(text: str) -> tuple[str, object]:
    """`--set FIELD=VALUE` of a SampleConfig field: VALUE as an int, float, None or string."""
    field, sep, value = text.partition("=")
    names = [f.name for f in dataclasses.fields(SampleConfig)]
    if not sep or field not in names:
        raise argparse.ArgumentTypeError(f"{text!r}: use FIELD=VALUE with FIELD one of {names}")
    if value in ("None", "True", "False"):
        return field, {"None": None, "True": True, "False": False}[value]
    for cast in (int, float):
        try:
            return field, cast(value)
        except ValueError:
            pass
    return field, value


def antidiagonal_configs(base: SampleConfig, args, prefix: str = "antidiag") -> dict:
    """The antidiagonal rows by name (`{prefix} {cell_score} a={alpha} s={stride}
    r={row_threshold}`, then ` t={dense_tail}` where it is not the default, ` fp8` with
    `estimate_fp8` and ` grp` with `group_estimate`): every combination of
    `add_antidiagonal_arguments`' flags, and `args.local_blocks` if set."""
    local = getattr(args, "local_blocks", None)
    tails = getattr(args, "dense_tails", [SampleConfig.dense_tail])
    return {
        f"{prefix} {cell} a={alpha} s={stride} r={row}"
        + ("" if tail == SampleConfig.dense_tail else f" t={tail}")
        + (" fp8" if fp8 == "on" else "")
        + (" grp" if grp == "on" else ""): dataclasses.replace(
            base,
            estimator="antidiagonal",
            alpha=alpha,
            stride=stride,
            cell_score=cell,
            row_threshold=row,
            dense_tail=tail,
            estimate_fp8=fp8 == "on",
            group_estimate=grp == "on",
            **({} if local is None else {"local_blocks": local}),
        )
        for cell in args.cell_scores
        for stride in args.strides
        for alpha in args.antidiagonal_alphas
        for row in args.row_thresholds
        for tail in tails
        for fp8 in getattr(args, "estimate_fp8", ["off"])
        for grp in getattr(args, "group_estimate", ["off"])
    }


def time_ms(fn: Callable[[], object], *, warmup_ms: float = 100, rep_ms: float = 500) -> float:
    """Median milliseconds of `fn()` after warm-up: CUDA events via do_bench, else a host clock."""
    if torch.cuda.is_available():
        import triton.testing

        return float(
            triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        )
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during `fn()` above what was allocated before, in MiB."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def format_table(columns: list[str], rows: list[dict]) -> str:
    """A Markdown table of `rows` in `columns` order; floats with 3 significant digits."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_results(
    name: str,
    title: str,
    tables: list[tuple[str, list[str], list[dict]]],
    notes: list[str],
    out_dir: pathlib.Path = RESULTS,
) -> pathlib.Path:
    """Write `<name>.json` and `<name>.md`; tables are (heading, columns, rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    data = {
        "title": title,
        "environment": env,
        "notes": notes,
        "tables": [{"heading": h, "columns": c, "rows": r} for h, c, r in tables],
    }
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
    md = [f"# {title}", "", *(f"- {k}: `{v}`" for k, v in env.items()), ""]
    for heading, columns, rows in tables:
        md += [f"## {heading}", "", format_table(columns, rows), ""]
    md += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(md))
    return path
