"""FX pass: replace qualifying `scaled_dot_product_attention` calls with the flexsample op.

A call qualifies when it has no dropout, its 4-D inputs need no gradient, and it is either
`is_causal=True` with no mask, or `is_causal=False` with a `[..., S, S]` mask that may be the
causal one (transformers passes causal masks explicitly when traced). A masked call keeps its
mask: the op checks it at run time and runs SampleAttention only if it is exactly causal, so
padding or custom masks keep SDPA's answer. Every other call stays as it is, and each decision
is recorded with its reason (`report()`).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx

from flexsample.compile.op import config_to_str  # also registers torch.ops.flexsample
from flexsample.config import SampleConfig

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
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}  # fmt: skip


@dataclasses.dataclass
class RewriteReport:
    """What the pass did across the graphs it saw since the last `reset_report()`."""

    rewritten: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (node, reason)


_report = RewriteReport()


def report() -> RewriteReport:
    """Rewritten-call count and skipped calls with reasons, since the last reset."""
    return _report


def reset_report() -> None:
    global _report
    _report = RewriteReport()


def _sdpa_arguments(node: torch.fx.Node) -> dict[str, object]:
    bound = dict(zip(_SDPA_PARAMS, node.args, strict=False))
    bound.update(node.kwargs)
    return {**_SDPA_DEFAULTS, **bound}


def _meta(node: object) -> torch.Tensor | None:
    meta = getattr(node, "meta", {})
    return meta.get("val", meta.get("example_value"))  # Dynamo graphs carry example_value


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


def rewrite_sdpa(gm: torch.fx.GraphModule, config: SampleConfig) -> int:
    """Rewrite the qualifying SDPA calls of `gm` in place; returns how many were rewritten."""
    config_str = config_to_str(config)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA_TARGETS:
            continue
        args = _sdpa_arguments(node)
        reason = _skip_reason(args)
        if reason is not None:
            _report.skipped.append((node.name, reason))
            logger.info("flexsample: left %s as SDPA: %s", node.name, reason)
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                torch.ops.flexsample.sample_attention.default,
                (args["query"], args["key"], args["value"], args["attn_mask"], args["scale"],
                 args["enable_gqa"], config_str),
            )  # fmt: skip
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    _report.rewritten += count
    logger.info(
        "flexsample: rewrote %d SDPA call(s) in a graph of %d nodes", count, len(gm.graph.nodes)
    )
    return count
