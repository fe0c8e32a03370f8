"""Architecture search: the shared search space (:mod:`.space`), device costs (:mod:`.cost`),
PNAS (:mod:`.pnas`) and DNAS with pruning (:mod:`.dnas`)."""
from .cost import (
    Budget, LatencyTable, candidate_costs, check_budget_feasible, cheapest, macs, measure_latency, parameters,
    peak_memory,
)
from .dnas import DNAS, DNASSettings, Prunode, StochasticLayer, Supernet, macs_latency
from .pnas import PNAS, IndicatorFeatures, Level, Surrogate, indicator_features, rank_correlation
from .space import CONV_OPS, OPS, Architecture, Block, InputShape, SearchSpace, build, layer_shapes

__all__ = ["CONV_OPS", "OPS", "Architecture", "Block", "InputShape", "SearchSpace", "build", "layer_shapes",
           "Budget", "LatencyTable", "candidate_costs", "check_budget_feasible", "cheapest", "macs",
           "measure_latency", "parameters", "peak_memory",
           "DNAS", "DNASSettings", "Prunode", "StochasticLayer", "Supernet", "macs_latency",
           "PNAS", "IndicatorFeatures", "Level", "Surrogate", "indicator_features", "rank_correlation"]
