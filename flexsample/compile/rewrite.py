"""FX pass: replace qualifying `scaled_dot_product_attention` calls with the flexsample op.

A call qualifies when it has no dropout, its 4-D inputs need no gradient, and it is either
`is_causal=True` with no mask, or `is_causal=False` with a `[..., S, S]` mask that may be the
causal one (transformers passes causal masks explicitly when traced). A masked call keeps its
mask (a 2-D one lifted to 4-D: the op reads 2-D masks as key padding): the op checks it at run
time and runs SampleAttention only if it is exactly causal, so padding or custom masks keep
SDPA's answer. Every other call stays as it is. Each graph's decisions are recorded with their
reasons, and each rewritten call is a named site whose run-time paths the op counts
(`report()`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import operator

import torch
import torch.fx

from flexsample.config import SampleConfig
from flexsample.op import config_to_str, site_paths  # also registers torch.ops.flexsample

logger = logging.getLogger("flexsample")

_SDPA_TARGETS = {
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
}
_SDPA_PARAMS = (
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
)
_SDPA_DEFAULTS = {
    "attn_mask": None,
    "dropout_p": 0.0,
    "is_causal": False,
    "scale": None,
    "enable_gqa": False,
}


@dataclasses.dataclass
class GraphReport:
    """What the pass did to one graph the backend compiled (a recompile is a new graph)."""

    index: int
    sdpa_calls: int = 0
    rewritten: list[str] = dataclasses.field(default_factory=list)  # op call sites
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (node, reason)

    def paths(self) -> collections.Counter[str]:
        """Paths the rewritten calls took at run time so far: "sparse" / "dense:<reason>"."""
        total: collections.Counter[str] = collections.Counter()
        for site in self.rewritten:
            total.update(site_paths[site])
        return total

    def __str__(self) -> str:
        if not self.sdpa_calls:
            return f"graph {self.index}: no SDPA call (nothing for flexsample to make sparse)"
        ran = ", ".join(f"{path} {n}" for path, n in sorted(self.paths().items())) or "not run"
        skipped = "".join(f"\n  left as SDPA: {node} ({why})" for node, why in self.skipped)
        return (
            f"graph {self.index}: {self.sdpa_calls} SDPA call(s), {len(self.rewritten)} "
            f"rewritten to the flexsample op; at run time: {ran}{skipped}"
        )


@dataclasses.dataclass
class CompileReport:
    """One `GraphReport` per graph compiled since the last `reset_report()`, in order."""

    graphs: list[GraphReport] = dataclasses.field(default_factory=list)

    @property
    def rewritten(self) -> int:
        """SDPA calls rewritten to the op, over all graphs (not how many ran sparse: `paths`)."""
        return sum(len(graph.rewritten) for graph in self.graphs)

    def paths(self) -> collections.Counter[str]:
        """Run-time paths of the rewritten calls of every graph."""
        total: collections.Counter[str] = collections.Counter()
        for graph in self.graphs:
            total.update(graph.paths())
        return total

    def __str__(self) -> str:
        if not self.graphs:
            return "flexsample backend: no graph compiled yet"
        lines = [str(graph) for graph in self.graphs]
        if not any(graph.sdpa_calls for graph in self.graphs):
            lines.append(
                "no compiled graph calls SDPA: flexsample changed nothing (a model loaded with "
                'attn_implementation="eager" computes attention without SDPA)'
            )
        return "\n".join(lines)


_report = CompileReport()
_site_numbers = itertools.count()


def report() -> CompileReport:
    """Per-graph rewrites, skipped calls with reasons, and run-time paths since the last reset;
    `print(report())` reads it out."""
    return _report


def reset_report() -> None:
    global _report
    _report = CompileReport()


def _sdpa_arguments(node: torch.fx.Node) -> dict[str, object]:
    bound = dict(zip(_SDPA_PARAMS, node.args, strict=False))
    bound.update(node.kwargs)
    return {**_SDPA_DEFAULTS, **bound}


#: Where a node keeps its example value (Dynamo graphs carry example_value).
_VALUE_KEYS = ("val", "example_value")


def _meta(node: object) -> torch.Tensor | None:
    meta = getattr(node, "meta", {})
    return meta.get("val", meta.get("example_value"))


def _skip_reason(args: dict[str, object]) -> str | None:
    mask = args["attn_mask"]
    if mask is not None:
        if args["is_causal"] is not False:
            return "attn_mask with is_causal=True"
        val = _meta(mask)
        if not isinstance(val, torch.Tensor):
            return "attn_mask has no shape information"
        not_square = "attn_mask is not [..., S, S] (not a causal self-attention mask)"
        if val.dim() < 2:
            return not_square
        rows, columns = val.shape[-2:]
        # Symbolic sizes are left to the op's run-time check (comparing them would add guards).
        if isinstance(rows, int) and isinstance(columns, int) and rows != columns:
            return not_square
        if val.dtype != torch.bool and not val.dtype.is_floating_point:
            return f"attn_mask dtype {val.dtype}"
    elif args["is_causal"] is not True:
        return f"not causal (is_causal={args['is_causal']!r}) and no mask"
    if args["dropout_p"] != 0.0:
        return f"dropout_p={args['dropout_p']!r}"
    if not isinstance(args["scale"], (float, int, type(None))):
        return "scale is not a constant"
    if not isinstance(args["enable_gqa"], bool):
        return "enable_gqa is not a constant"
    for name in ("query", "key", "value"):
        val = _meta(args[name])
        if val is None:
            return f"no shape information for {name}"
        if val.dim() != 4:
            return f"{name} is {val.dim()}-D, not [B, H, S, D]"
        if val.requires_grad:
            return "inputs require grad (the sparse path is for inference)"
    return None


def _lift_to_4d(graph: torch.fx.Graph, mask: torch.fx.Node) -> torch.fx.Node:
    """`mask[None, None]`: SDPA reads a 2-D mask as `[Sq, Skv]`, the op as `[B, Skv]` key
    padding (the transformers door's format), so the pass hands the op SDPA's meaning in 4-D."""
    lifted = graph.call_function(operator.getitem, (mask, (None, None)))
    lifted.meta = {key: val[None, None] for key, val in mask.meta.items() if key in _VALUE_KEYS}
    return lifted


def rewrite_sdpa(gm: torch.fx.GraphModule, config: SampleConfig) -> int:
    """Rewrite the qualifying SDPA calls of `gm` in place; returns how many were rewritten."""
    config_str = config_to_str(config)
    graph = GraphReport(index=len(_report.graphs))
    _report.graphs.append(graph)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA_TARGETS:
            continue
        graph.sdpa_calls += 1
        args = _sdpa_arguments(node)
        reason = _skip_reason(args)
        if reason is not None:
            graph.skipped.append((node.name, reason))
            logger.info("flexsample: left %s as SDPA: %s", node.name, reason)
            continue
        # Graph indices restart at a reset, site numbers never: old graphs may still run.
        site = f"site{next(_site_numbers)}:{node.name}"
        with gm.graph.inserting_before(node):
            mask = args["attn_mask"]
            if mask is not None and _meta(mask).dim() == 2:
                mask = _lift_to_4d(gm.graph, mask)
            new = gm.graph.call_function(
                torch.ops.flexsample.sample_attention.default,
                (
                    args["query"],
                    args["key"],
                    args["value"],
                    mask,
                    args["scale"],
                    args["enable_gqa"],
                    config_str,
                    site,
                ),
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        graph.rewritten.append(site)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    logger.info(
        "flexsample: rewrote %d SDPA call(s) in a graph of %d nodes", count, len(gm.graph.nodes)
    )
    return count
