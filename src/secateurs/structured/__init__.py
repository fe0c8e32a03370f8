"""Structured pruning that makes models really smaller: trace, group, score, remove, export.

>>> graph = build_graph(model, torch.randn(1, 3, 32, 32))
>>> small = prune_channels(model, torch.randn(1, 3, 32, 32), 0.5, importance="l1")
>>> save_compact(small, "small.pt2", torch.randn(1, 3, 32, 32))   # reload: torch.export.load
"""
from __future__ import annotations

from .cost import Cost, model_cost
from .export import load_compact, save_compact
from .graph import DependencyGraph, Group, Slice, build_graph, build_groups
from .importance import IMPORTANCE, SelectionImportance, bn_scale_importance, l1_importance, taylor_importance
from .ispasp import ISpaSP, ISpaSPSelection, ispasp_select
from .prune import compact_zero_channels, plan_for, plan_removal, prune_channels, prune_to_flops, zero_units
from .rebuild import remove_units

__all__ = [
    "Cost", "model_cost", "save_compact", "load_compact", "DependencyGraph", "Group", "Slice",
    "build_graph", "build_groups", "IMPORTANCE", "l1_importance", "bn_scale_importance",
    "taylor_importance", "plan_removal", "prune_channels", "prune_to_flops",
    "compact_zero_channels", "zero_units", "remove_units", "SelectionImportance", "ISpaSP",
    "ISpaSPSelection", "ispasp_select", "plan_for",
]
