"""Brain-inspired iterative importance-score pruning: a connection goes once it has been "not
activated or less activated multiple times consecutively" (Zhao & Zeng, "Dynamically
Optimizing Network Structure Based on Synaptic Pruning in the Brain", Frontiers in Systems
Neuroscience 15:620558, 2021, doi:10.3389/fnsys.2021.620558).

Why this paper. Issue 17 asks for "a simple importance metric that deactivates unimportant
connections per task, brain-inspired". Zhao & Zeng take the developing brain's synaptic
pruning rule ("use it or lose it": a synapse that stays unused is eliminated) as the whole
method: a per-connection activity measure, checked again and again during training, and a
connection removed only after it has been low on several consecutive checks; each task
(MNIST, Fashion-MNIST, CIFAR-10 in the paper) gets its own pruned structure from training on
it. Their experiments use fully connected networks on MNIST and Fashion-MNIST, the data sets
of this comparison. (Continual-learning readings of "per task", e.g. Continual Prune-and-Select,
Dekhovich et al. 2023, select a subnetwork per task of a sequence; they are task-isolation
methods around a pruning step, not a pruning rule, and not brain-derived in their rule.)

What is implemented here, exactly (the library's formulation; the paper's text gave the rule,
the numbers below are ours)
---------------------------------------------------------------------------------------------
Every ``every`` steps from ``start`` to ``end`` (a *check*):

1. **Importance** -- :func:`secateurs.scores.activity`: ``a_ji = |w_ji| E_x|x_i|``, the mean
   absolute contribution of connection ``i -> j`` to unit ``j``'s input on ``check_batches``
   training batches (the next ones of ``batches``, in order). Unused inputs score 0.
2. **"Less activated"** -- :func:`secateurs.streaks.below_layer_mean`: ``a < ratio`` x the
   mean activity of the layer's active connections (``ratio`` = 1: below the layer's average).
3. **Consecutive** -- :class:`secateurs.streaks.Streaks`: each connection's count of
   consecutive low checks; a check where it is not low resets it to 0.
4. **Prune** the connections whose streak reached ``patience`` -- at most as many as the
   cubic schedule (Zhu & Gupta 2017, Eq. 1, from 0 at ``start`` to ``sparsity`` at ``end``)
   allows by now, lowest relative activity ``a / mean_layer`` first, across all layers (the
   test is per layer, so the ranking is relative too). The paper has no target sparsity; the
   schedule is the cap that makes the comparison at 90 / 95 / 98% exact and the pruning as
   gradual as GMP's. A connection is *never* pruned before its streak reaches ``patience``,
   except by step 5.
5. **Exact target at** ``end``: if the rule has not removed enough connections by the last
   check, the rest are removed by (longest streak, then lowest relative activity) and the
   number is recorded in ``history`` (``forced``), so a run shows how much of the pruning the
   rule did. After ``end`` the mask is fixed and the network fine-tunes.

Masks are applied after ``optimizer.step()`` by :class:`~secateurs.masks.Masks` like every
other method; the only extra cost is one forward pass over ``check_batches`` batches at each
check, through hooks that exist during that pass only. Every mask update goes through the
engine's :func:`~secateurs.engine.prune` and its per-layer count check.
"""
from __future__ import annotations

import torch

from ..allocation import check_sparsity, keep_count
from ..engine import prune
from ..errors import ConfigError
from ..schedules import Cubic
from ..scores import activity, magnitude
from ..selection import topk_mask
from ..streaks import Streaks, below_layer_mean
from ..validate import check_int, check_number
from .during import _DuringTraining
from .registry import METHODS


@METHODS.register("synaptic", "brain-inspired synaptic pruning: drop a connection after `patience` consecutive "
                               "checks below its layer's mean activity |w|E|x| (Zhao & Zeng 2021)")
class SynapticPruning(_DuringTraining):
    """Brain-inspired synaptic pruning (Zhao & Zeng 2021); the formulation and the choices are
    in this module's docstring. Every ``every`` steps between ``start`` and ``end``: score the
    connections' activity on ``check_batches`` batches, count consecutive checks below
    ``ratio`` x their layer's mean, and prune those low ``patience`` times in a row, within the
    cubic schedule's budget; the target ``sparsity`` is exact from ``end`` on. Needs
    ``batches`` (an iterable of ``(x, y)``, e.g. an unshuffled ``DataLoader``)."""

    warn_dense_step = False
    _plan_fields = ("patience", "ratio", "check_batches")

    def __init__(self, model, optimizer=None, *, sparsity: float, total_steps: int, steps_per_epoch: int | None = None,
                 patience: int = 3, ratio: float = 1.0, every=100, start="0it", end="50%", check_batches: int = 1,
                 scope: str = "global", batches=None, **kwargs):
        self._length(total_steps, steps_per_epoch)
        check_sparsity(sparsity)
        if sparsity == 0:
            raise ConfigError("synaptic pruning sparsity 0 prunes nothing; give the target sparsity, e.g. sparsity=0.9")
        check_int(patience, "synaptic pruning patience", minimum=1,
                  hint="the consecutive low-activity checks before a connection is pruned, e.g. 3")
        check_number(ratio, "synaptic pruning ratio", above=0.0, finite=True,
                     hint="a connection is less activated below ratio x its layer's mean activity, e.g. 1.0")
        check_int(check_batches, "synaptic pruning check_batches", minimum=1,
                  hint="training batches the activity is averaged over at each check, e.g. 1")
        if scope != "global":
            raise ConfigError(f"synaptic pruning ranks the connections that met the rule across all layers, so scope must "
                              f"be 'global', got {scope!r}; remove prune.scope or set it to global")
        if batches is None:
            raise ConfigError("synaptic pruning scores each connection's activity on data, so it needs batches: pass "
                              "batches=<an iterable of (x, y) batches>, e.g. an unshuffled DataLoader of training data")
        schedule = Cubic(final=sparsity, start=self._steps(start, "start"), end=self._steps(end, "end"),
                         every=self._steps(every, "every"))
        window = schedule.end - schedule.start
        if patience * schedule.every > window:
            raise ConfigError(
                f"synaptic pruning patience={patience} checks every {schedule.every} steps need "
                f"{patience * schedule.every} steps, but start..end spans {window}, so the rule could never fire "
                "before the end; lower patience or every, or widen start..end"
            )
        super().__init__(model, optimizer, score=magnitude, sparsity=sparsity, scope="global", schedule=schedule,
                         batches=batches, **kwargs)
        if any(s > 0 for s in self.fixed_sparsity.values()):
            raise ConfigError("synaptic pruning decides each layer's share by the rule, so layer_sparsity cannot pin one; "
                              "use keep_dense=[...] for layers to keep whole, or exclude=[...] for layers not to prune")
        self.patience, self.ratio, self.check_batches = patience, float(ratio), check_batches
        self.streaks = Streaks(self.masks.masks)

    # -- the rule ---------------------------------------------------------------------------
    def check(self) -> dict:
        """One check: activity, streak update; returns ``{"relative": a / layer mean,
        "due": streak >= patience}`` per layer (active, prunable connections only)."""
        masks = self.masks.masks
        weights = self.masks.weights()
        scores = activity(self.model, weights, [self._next_batch() for _ in range(self.check_batches)])
        low = below_layer_mean(scores, masks, self.ratio)
        self.streaks.update_(low)
        relative = {}
        for name, s in scores.items():
            mean = (s.double() * masks[name]).sum() / masks[name].sum().clamp(min=1)
            relative[name] = (s.double() / mean).float() if mean > 0 else torch.zeros_like(s)
        due = {n: d & masks[n] & (n not in self.fixed_sparsity) for n, d in self.streaks.reached(self.patience).items()}
        return {"relative": relative, "due": due}

    def _remove(self, rank: dict, eligible: dict, n: int) -> dict[str, int]:
        """Remove the ``n`` eligible connections of lowest ``rank`` (across layers) through the
        engine; returns the per-layer keep counts the engine was held to."""
        names = self.masks.names()
        available = int(sum(int(e.sum()) for e in eligible.values()))
        if n > available:
            raise ConfigError(f"synaptic pruning must remove {n} connections but only {available} may go (the rest are "
                              "in keep_dense layers); lower the sparsity or keep fewer layers dense")
        flat = torch.cat([torch.where(eligible[k], -rank[k].float(), torch.tensor(-float("inf"))).reshape(-1).cpu()
                          for k in names])
        chosen = topk_mask(flat, n)
        active, keep, offset = self.masks.active(), {}, 0
        for k in names:
            size = self.masks.masks[k].numel()
            keep[k] = active[k] - int(chosen[offset:offset + size].sum())
            offset += size
        big = torch.finfo(torch.float32).max
        scores = {k: torch.where(eligible[k], rank[k].float(), torch.full_like(rank[k].float(), big)) for k in names}
        new = prune(self.masks.masks, scores, keep)
        self.masks.update_(new, keep)  # raises if a layer's count differs from the plan
        self.masks.sync_()
        self.masks.enforce_(self.optimizer)
        return keep

    def step(self) -> None:
        if self._step_check:
            self._check_step()
        self.steps += 1
        t = self.steps
        if not self.schedule.updates_at(t):
            self.masks.enforce_(self.optimizer)
            return
        with torch.no_grad():
            self.masks.enforce_(self.optimizer)
            state = self.check()
            total = sum(self.masks.numel().values())
            active = sum(self.masks.active().values())
            budget = max(active - keep_count(total, self.schedule.sparsity_at(t)), 0)
            due = int(sum(int(d.sum()) for d in state["due"].values()))
            removed = min(budget, due)
            if removed:
                self._remove(state["relative"], state["due"], removed)
            forced = 0
            if t >= self.schedule.end:
                forced = active - removed - keep_count(total, self.target)
                if forced > 0:
                    streak = {k: c.float() for k, c in self.streaks.counts.items()}
                    rank = {k: state["relative"][k] / (1.0 + state["relative"][k].max()) - streak[k] for k in streak}
                    eligible = {k: m & (k not in self.fixed_sparsity) for k, m in self.masks.masks.items()}
                    self._remove(rank, eligible, forced)
            if removed or forced > 0 or t >= self.schedule.end:
                self._record("prune", self.schedule.sparsity_at(t), due=due, removed=removed, forced=max(forced, 0))

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["streaks"] = self.streaks.state_dict()
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if "streaks" not in state:
            raise ConfigError("this sparsifier state has no synaptic pruning part (the streaks); "
                              "resume it with the method that saved it")
        self.streaks.load_state_dict(state["streaks"])
