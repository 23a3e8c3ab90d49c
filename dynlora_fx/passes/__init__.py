"""Graph passes: each a function over an ``fx.GraphModule`` with one job.

- :func:`functionalize_leaves` — ``call_module`` Linear/Conv -> functional calls on ``get_attr`` weights
- :func:`find_targets` — analysis: which weights feed matrix products, and why others are skipped
- :func:`insert_adapters` — rewrite: add ``s·B(A x)`` branches or ``W + s·B@A`` weights
- :func:`remove_adapters` — rewrite: drop adapter nodes (merge folds the weights first)
- :func:`functionalize_batch_norm` — rewrite: training-mode batch norm as a pure normalisation + a stats update
- :func:`find_regions` — analysis: the model's repeated blocks as contiguous regions of the graph
- :func:`outline_regions` — rewrite: each region becomes a call to its runner (``runtime/regions.py``)
"""

from .batch_norm import functionalize_batch_norm, training_batch_norms
from .outline import outline_regions, region_bodies, region_modules
from .find_targets import Skip, Target, TargetPlan, find_targets, weight_uses
from .functionalize import functionalize_leaves
from .insert_adapters import insert_adapters
from .regions import Region, RegionPlan, find_regions, repeated_blocks
from .remove_adapters import remove_adapters

__all__ = ["functionalize_batch_norm", "training_batch_norms", "Skip", "Target", "TargetPlan", "find_targets", "weight_uses", "functionalize_leaves",
           "insert_adapters", "remove_adapters", "Region", "RegionPlan", "find_regions", "repeated_blocks",
           "outline_regions", "region_bodies", "region_modules"]
