"""Methods: short recipes that compose a score, an allocation and a schedule.

``METHODS`` maps names to sparsifier factories for configs and the CLI.
"""
from .at_init import SNIP, GraSP, RandomInit, SynFlow
from .base import Sparsifier
from .during import CTRE, GMP, SET, GraNet, RigL
from .gibbs import GibbsPruning
from .lottery import LotteryTicket, criterion_masks, half_rate_output_sparsity
from .magnitude import Magnitude, Random
from .nm import NMSparsifier
from .registry import METHODS
from .supermask import Supermask
from .synaptic import SynapticPruning

__all__ = ["Sparsifier", "Magnitude", "Random", "GMP", "SET", "RigL", "GraNet", "CTRE", "GibbsPruning", "SNIP", "GraSP", "SynFlow", "RandomInit", "LotteryTicket", "criterion_masks", "half_rate_output_sparsity", "Supermask", "SynapticPruning", "NMSparsifier", "METHODS"]
