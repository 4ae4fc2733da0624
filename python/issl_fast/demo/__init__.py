"""``issl-fast demo``: train a small SSL encoder on scikit-learn's digits with planted duplicates,
outliers and a shifted group, then find them with Influence-SSL and write a report."""

from .run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
