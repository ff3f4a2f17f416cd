"""PNG plots from the benchmark JSON files: `python -m bench.plot [attention ttft accuracy niah]`.

attention: speedup of flexsample's total (mask build + sparse attention) over SDPA cuDNN vs
S, one line per config; ttft: prefill speedup over eager SDPA vs S, one line per mode;
accuracy: true CRA and output error vs density, one marker per method; niah: exact-match
heat maps, needle depth x context length, one per method; realtext: perplexity ratio vs
density, one marker per method.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.harness import RESULTS  # noqa: E402


def _load(name: str, directory: pathlib.Path) -> tuple[list[dict], dict]:
    data = json.loads((directory / f"{name}.json").read_text())
    return data["tables"][0]["rows"], data["environment"]


def _subtitle(env: dict) -> str:
    return f"{env.get('gpu', '')}, torch {env['torch']}, triton {env['triton']}"


def _lines(ax, rows, group: str, y: str) -> None:
    for label in dict.fromkeys(row[group] for row in rows):
        points = [(row["S"], row[y]) for row in rows if row[group] == label and y in row]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=str(label))
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("sequence length S")
    ax.legend(fontsize=8)


def attention(directory: pathlib.Path) -> pathlib.Path:
    rows, env = _load("attention", directory)
    # One line per config and flex backend (results before the backend column: config only).
    rows = [
        {**row, "line": " ".join(str(row[k]) for k in ("config", "backend") if k in row)}
        for row in rows
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    _lines(axes[0], rows, "line", "x vs cuDNN")
    axes[0].set_ylabel("speedup of total vs SDPA cuDNN")
    _lines(axes[1], rows, "line", "efficiency")
    axes[1].set_ylabel("sparse efficiency (density x dense flex / sparse)")
    fig.suptitle(f"flexsample attention op, Llama-3-8B shape, bf16 ({_subtitle(env)})", fontsize=9)
    return _save(fig, directory / "attention.png")


def ttft(directory: pathlib.Path) -> pathlib.Path:
    rows, env = _load("ttft", directory)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    _lines(ax, rows, "mode", "x vs eager SDPA")
    ax.set_ylabel("prefill speedup vs eager SDPA")
    ax.set_title(f"TTFT, random-init Llama-3-8B ({_subtitle(env)})", fontsize=9)
    return _save(fig, directory / "ttft.png")


def accuracy(directory: pathlib.Path) -> pathlib.Path:
    rows, env = _load("accuracy", directory)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = dict.fromkeys(row["method"] for row in rows)
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        for ax, y in zip(axes, ("CRA mean", "err mean"), strict=True):
            ax.scatter([r["density"] for r in mine], [r[y] for r in mine], label=method, s=18)
    axes[0].set_ylabel("true CRA (mean over rows and heads)")
    axes[1].set_ylabel("output relative error (mean over heads)")
    for ax in axes:
        ax.set_xlabel("density (kept share of the causal area)")
        ax.legend(fontsize=8)
    lengths = sorted({row["S"] for row in rows})
    fig.suptitle(f"Accuracy at equal density, S in {lengths} ({_subtitle(env)})", fontsize=9)
    return _save(fig, directory / "accuracy.png")


def niah(directory: pathlib.Path, name: str = "niah") -> pathlib.Path:
    data = json.loads((directory / f"{name}.json").read_text())
    rows = data["tables"][1]["rows"]  # by length and depth
    methods = list(dict.fromkeys(row["method"] for row in rows))
    lengths = sorted({row["S"] for row in rows})
    depths = sorted({row["depth"] for row in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for row in rows:
            if row["method"] == method:
                grid[depths.index(row["depth"])][lengths.index(row["S"])] = row["accuracy"]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{n / 1024:g}K" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("context length")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="exact match")
    fig.suptitle(f"Needle in a haystack ({_subtitle(data['environment'])})", fontsize=9)
    fig.savefig(directory / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return directory / f"{name}.png"


def realtext(directory: pathlib.Path, name: str = "realtext") -> pathlib.Path:
    """Perplexity ratio vs dense (last 2K tokens, with its standard error) against density."""
    rows, env = _load(name, directory)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        if isinstance(row.get("density"), float) and isinstance(row.get("ratio"), float):
            ax.errorbar(
                row["density"],
                row["ratio"],
                yerr=row.get("ratio SE", 0.0),
                fmt="o",
                ms=4,
                capsize=2,
                label=row["method"],
            )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(1.01, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("density (kept share of the causal area)")
    ax.set_ylabel("perplexity of the last 2K tokens / dense")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"Real-text judge ({_subtitle(env)})", fontsize=9)
    return _save(fig, directory / f"{name}.png")


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = {
    "attention": attention,
    "ttft": ttft,
    "accuracy": accuracy,
    "niah": niah,
    "realtext": realtext,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(PLOTS))
    parser.add_argument("--dir", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    for name in args.names:
        if (args.dir / f"{name}.json").exists():
            print(PLOTS[name](args.dir))


if __name__ == "__main__":
    main()
