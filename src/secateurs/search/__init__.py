"""Architecture search: the shared search space (:mod:`.space`), device costs (:mod:`.cost`),
PNAS (:mod:`.pnas`) and DNAS with pruning (:mod:`.dnas`)."""
from .pnas import PNAS, IndicatorFeatures, Level, Surrogate, indicator_features, rank_correlation
from .space import CONV_OPS, OPS, Architecture, Block, InputShape, SearchSpace, build, layer_shapes

__all__ = ["CONV_OPS", "OPS", "Architecture", "Block", "InputShape", "SearchSpace", "build", "layer_shapes",
           "PNAS", "IndicatorFeatures", "Level", "Surrogate", "indicator_features", "rank_correlation"]
