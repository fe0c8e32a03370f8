"""Growing networks and architecture search: GradMax, widening, deepening, grow-and-prune.

>>> grower = Grower(model, optimizer, {"net.1": 300, "net.3": 100}, example_input=x[:8],
...                 init="gradmax", start=100, every=100, events=9, batches=probe)
>>> ...; optimizer.step(); grower.step()     # widens at the scheduled steps
"""
from __future__ import annotations

from .deepen import MLPLayout, insert_identity_layer, mlp_layout
from .gradmax import (
    GROWTH_INITS, ZERO_INCOMING, gradmax_directions, growth_gradient, growth_matrix,
    new_unit_weights, outgoing_gradient,
)
from .grower import Grower, widths
from .heuristic import USEFULNESS, GrowPrune, GrowPruneConfig
from .widen import GrowthSite, add_units, growth_site, replace_parameter, unit_norms

__all__ = [
    "GROWTH_INITS", "ZERO_INCOMING", "gradmax_directions", "growth_gradient",
    "growth_matrix", "new_unit_weights", "outgoing_gradient", "Grower", "widths",
    "GrowthSite", "add_units", "growth_site", "replace_parameter", "unit_norms",
    "MLPLayout", "insert_identity_layer", "mlp_layout", "USEFULNESS", "GrowPrune", "GrowPruneConfig",
]
