"""Streaks: per-connection counts of consecutive checks on which a condition held.

Activity-dependent pruning in the brain removes a synapse that stays unused for a while, not
one that is quiet once; Zhao & Zeng (2021, Front. Syst. Neurosci. 15:620558) carry that over
to networks: a connection is pruned when it is "not activated or less activated multiple times
consecutively". Two small parts make that rule composable with any score:

* :func:`below_layer_mean` -- the "less activated" test: a score under ``ratio`` times the
  mean of its layer's *active* scores (relative, so one ratio suits layers of any scale);
* :class:`Streaks` -- the state: for every element, how many checks in a row the test held.
  A check where it fails resets the count to 0; :meth:`Streaks.reached` says which elements
  have held it ``patience`` times in a row.

The state is keyed by parameter name and checkpointed with the sparsifier that owns it.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .errors import CheckpointError, ConfigError
from .validate import check_int, check_number


def below_layer_mean(
    scores: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], ratio: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``score < ratio * mean(score over the layer's active elements)``, for active elements
    only (an inactive element is never "below": it has nothing left to lose). A layer with no
    active element, or all of whose active scores are 0, has nothing below (0 < 0 is false)."""
    check_number(ratio, "below_layer_mean ratio", above=0.0, finite=True,
                 hint="the fraction of the layer's mean activity under which a connection counts as less activated, e.g. 1.0")
    out = {}
    for name, s in scores.items():
        mask = masks[name]
        s = s.detach().double()
        n = mask.sum()
        mean = (s * mask).sum() / n.clamp(min=1)
        out[name] = mask & (s < ratio * mean)
    return out


class Streaks:
    """Per-element counts of consecutive checks on which a condition held (int32 tensors,
    shaped like the parameters they follow)."""

    def __init__(self, shapes: Mapping[str, torch.Tensor]):
        self.counts: dict[str, torch.Tensor] = {
            n: torch.zeros(t.shape, dtype=torch.int32, device=t.device) for n, t in shapes.items()
        }

    def update_(self, hits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One check: where ``hits`` is True the count grows by one, elsewhere it restarts at 0
        (a streak must be consecutive). Returns the counts."""
        if set(hits) != set(self.counts):
            raise ConfigError(f"Streaks.update_ got {sorted(hits)[:4]}, but it follows {sorted(self.counts)[:4]}")
        for name, hit in hits.items():
            c = self.counts[name]
            self.counts[name] = torch.where(hit.to(c.device), c + 1, torch.zeros_like(c))
        return self.counts

    def reached(self, patience: int) -> dict[str, torch.Tensor]:
        """Elements whose current streak is at least ``patience`` checks."""
        check_int(patience, "patience", minimum=1, hint="the number of consecutive checks, e.g. 3")
        return {n: c >= patience for n, c in self.counts.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: c.to("cpu", copy=True) for n, c in self.counts.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.counts) or any(state[n].shape != c.shape for n, c in self.counts.items()):
            raise CheckpointError("the saved streaks are for other parameters (names or shapes differ); "
                                  "resume with the model and sparsifier that saved them")
        self.counts = {n: state[n].to(device=c.device, dtype=torch.int32) for n, c in self.counts.items()}
