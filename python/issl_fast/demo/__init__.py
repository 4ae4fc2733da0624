"""``issl-fast demo``: train a small SSL encoder on scikit-learn's digits with planted duplicates,
outliers and a shifted group, then find them with Influence-SSL and write a report."""

from .run import DemoConfig, DemoOutputError, check_output, run_demo

__all__ = ["DemoConfig", "DemoOutputError", "check_output", "run_demo"]
