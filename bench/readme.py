"""README tables rendered from `bench/results/*.json`, so that no number in them is typed by hand.

A table in README.md is a block

    <!-- results NAME table=I columns="A;B C;D" where="A:v1|v 2;B:v" -->
    (generated: a source line, then the table)
    <!-- /results -->

that keeps the rows of table I of `bench/results/NAME.json` whose columns hold one of the
listed values (compared as text), in the file's order, with the listed columns (options are
shell-quoted).
`python -m bench.readme` rewrites every block; `tests/test_readme.py` fails when README.md
differs from what the results files give.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shlex

from bench.harness import RESULTS, format_table

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(<!-- results (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def render_block(spec: str, results: pathlib.Path = RESULTS) -> str:
    """The generated text of one block, from its spec (`NAME table=I columns=... where=...`)."""
    name, *fields = shlex.split(spec)
    options = dict(field.split("=", 1) for field in fields)
    data = json.loads((results / f"{name}.json").read_text())
    table = data["tables"][int(options.get("table", 0))]
    columns = options["columns"].split(";") if "columns" in options else table["columns"]
    wanted = {}
    for clause in options["where"].split(";") if "where" in options else []:
        column, values = clause.split(":", 1)
        wanted[column] = set(values.split("|"))
    unknown = [c for c in [*columns, *wanted] if c not in table["columns"]]
    if unknown:
        raise ValueError(f"{name}.json table {table['heading']!r} has no column(s) {unknown}")
    rows = [r for r in table["rows"] if all(str(r.get(c)) in v for c, v in wanted.items())]
    if not rows:
        raise ValueError(f"no row of {name}.json table {table['heading']!r} matches {wanted}")
    env = data["environment"]
    source = (
        f"From `bench/results/{name}.json` ({env.get('gpu', 'CPU')}, torch {env.get('torch')}, "
        f"{env.get('date')}; `{env.get('command')}`):"
    )
    return f"{source}\n\n{format_table(columns, rows)}\n"


def render(text: str, results: pathlib.Path = RESULTS) -> str:
    """`text` with every results block regenerated."""
    return _BLOCK.sub(
        lambda m: m.group(1) + render_block(m.group("spec"), results) + m.group(4), text
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    args = parser.parse_args(argv)
    current = README.read_text()
    fresh = render(current)
    if args.check:
        raise SystemExit(0 if fresh == current else 1)
    README.write_text(fresh)


if __name__ == "__main__":
    main()
