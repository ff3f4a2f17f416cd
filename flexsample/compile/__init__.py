"""Compiler path: `torch.compile(model, backend="flexsample")` (DESIGN §4)."""

from flexsample.compile.backend import backend, flexsample_backend
from flexsample.compile.rewrite import RewriteReport, report, reset_report

__all__ = ["RewriteReport", "backend", "flexsample_backend", "report", "reset_report"]
