"""Graph passes: each a function over an ``fx.GraphModule`` with one job.

- :func:`functionalize_leaves` — ``call_module`` Linear/Conv -> functional calls on ``get_attr`` weights
- :func:`find_targets` — analysis: which weights feed matrix products, and why others are skipped
- :func:`insert_adapters` — rewrite: add ``s·B(A x)`` branches or ``W + s·B@A`` weights
- :func:`remove_adapters` — rewrite: drop adapter nodes (merge folds the weights first)
"""

from .find_targets import Skip, Target, TargetPlan, find_targets, weight_uses
from .functionalize import functionalize_leaves
from .insert_adapters import insert_adapters
from .remove_adapters import remove_adapters

__all__ = ["Skip", "Target", "TargetPlan", "find_targets", "weight_uses", "functionalize_leaves",
           "insert_adapters", "remove_adapters"]
