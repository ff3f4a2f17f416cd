"""Compiler path: `torch.compile(model, backend="flexsample")` (ALGORITHM §5)."""

from flexsample.compile.backend import backend, flexsample_backend
from flexsample.compile.rewrite import CompileReport, GraphReport, report, reset_report

__all__ = [
    "CompileReport",
    "GraphReport",
    "backend",
    "flexsample_backend",
    "report",
    "reset_report",
]
