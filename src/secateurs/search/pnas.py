"""Progressive Neural Architecture Search (PNAS) after Liu et al., "Progressive Neural
Architecture Search", ECCV 2018 (arXiv:1712.00559).

PNAS is sequential model-based optimisation over architectures of increasing size. It trains
every one-block candidate, fits a cheap *surrogate* that predicts a candidate's accuracy from
its encoding, and then, level by level, expands every candidate trained at the previous level
by one block, ranks all the children with the surrogate and trains only the ``K`` it predicts
best (the paper's beam; ``K = 256`` there). The surrogate is refit after every level on all the
accuracies measured so far, so it is asked to extrapolate one block further each time -- the
reason it must rank well rather than regress well, and why the search reports its rank
correlation with the accuracies it then measures.

In this module a "block" is one block of :mod:`.space`'s chains (a conv, depthwise-separable
or fc layer appended to the chain), not the paper's cell block (two inputs, two operations and
a combiner inside a repeated cell): level ``b`` holds chains of ``b`` blocks.

What follows the paper, and where it is simplified:

* level 1 trains every (admissible) one-block candidate, as the paper trains all of its 136
  one-block cells; ``first_level`` optionally trains a deterministic random subset instead when
  the roots alone exceed the training budget;
* level ``b >= 2`` expands *every* candidate trained at level ``b - 1`` (the paper's
  ``S_b = expand(S_{b-1})``; after level 1 that set is exactly the previous top ``K``),
  predicts every child and trains the top ``K`` by predicted accuracy;
* the surrogate is the paper's MLP-ensemble variant: ``members`` small MLPs, each fit *from
  scratch* after every level on all measured data except one fold (the paper fits 5 predictors
  each to 4/5 of the data), with the paper's L1 loss. The paper's MLP embeds the cell's tokens
  and averages the block embeddings; here the encoding is :meth:`SearchSpace.features`' fixed
  per-position vector (one-hot op, log2 width, pool flag), which a plain MLP reads directly,
  optionally extended with extra features (e.g. the TE-NAS indicators, :func:`indicator_features`);
* the ensemble's spread (``predict``'s ``std``) is reported but not used for selection: PNAS
  ranks by the mean prediction only.

The search state (:class:`PNAS`) trains nothing itself: a procedure asks it what to train
(:meth:`PNAS.propose`), trains those, and reports the accuracies (:meth:`PNAS.observe`). Every
random choice comes from :func:`~secateurs.seeding.derive_seed` of the search's seed and the
surrogate is refit from the observed data each level, so the proposals are a pure function of
the seed and the observed accuracies: a procedure resumes by replaying the accuracies it has
stored (:meth:`PNAS.replay`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..analysis.indicators import indicators
from ..errors import ConfigError
from ..seeding import derive_seed
from ..validate import check_bool, check_int, check_number, describe
from .space import Architecture, InputShape, SearchSpace, build

__all__ = ["rank_correlation", "Surrogate", "Level", "PNAS", "IndicatorFeatures", "indicator_features"]


# --- rank correlation --------------------------------------------------------------------------

def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ascending ranks; tied values share the mean of their positions."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends - 1) / 2.0 + 1.0)[group]
    return ranks


def _as_vector(values, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a sequence of numbers, got {type(values).__name__}") from None
    if x.ndim != 1:
        raise ConfigError(f"{what} must be one-dimensional, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ConfigError(f"{what} holds NaN or infinite values, which cannot be ranked; drop those entries first")
    return x


def rank_correlation(a, b, *, method: str = "spearman") -> float:
    """How well the ordering of ``a`` matches that of ``b``: Spearman's rho (the Pearson
    correlation of the average ranks, so ties count as in scipy) or Kendall's tau-b.

    This is the measure the PNAS paper uses for its predictor, because the search only needs
    the surrogate to order candidates, not to get their accuracies right. Returns NaN when it
    is undefined: fewer than 2 pairs, or one side constant."""
    x, y = _as_vector(a, "a"), _as_vector(b, "b")
    if len(x) != len(y):
        raise ConfigError(f"rank_correlation needs two sequences of equal length, got {len(x)} and {len(y)}")
    if method not in ("spearman", "kendall"):
        raise ConfigError(f"unknown rank correlation method {method!r}; use 'spearman' or 'kendall'")
    if len(x) < 2:
        return math.nan
    if method == "spearman":
        rx, ry = _average_ranks(x), _average_ranks(y)
        rx, ry = rx - rx.mean(), ry - ry.mean()
        denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
        return math.nan if denominator == 0 else float(rx @ ry) / denominator
    upper = np.triu_indices(len(x), 1)
    sx, sy = np.sign(x[:, None] - x[None, :])[upper], np.sign(y[:, None] - y[None, :])[upper]
    pairs = len(sx)
    denominator = math.sqrt(float(pairs - np.count_nonzero(sx == 0)) * float(pairs - np.count_nonzero(sy == 0)))
    return math.nan if denominator == 0 else float((sx * sy).sum()) / denominator


# --- the surrogate -----------------------------------------------------------------------------

def _check_hidden(hidden) -> tuple[int, ...]:
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise ConfigError(f"surrogate hidden must be a list of layer widths (e.g. [64, 64]), got {describe(hidden)}")
    for width in hidden:
        check_int(width, "surrogate hidden width", minimum=1, hint="list the hidden layer widths, e.g. [64, 64]")
    return tuple(hidden)


class Surrogate:
    """An ensemble of ``members`` small MLPs that predicts accuracy from architecture features
    (PNAS's MLP-ensemble predictor, Liu et al. 2018, Sec. 3.4).

    :meth:`fit` standardises the features and the targets, then trains every member from scratch
    with ``steps`` full-batch Adam steps (L2 ``weight_decay``) on the L1 loss (the paper's loss;
    ``loss="mse"`` for squared error). The members differ in their initialisation and their
    data: with ``resample="folds"`` (the paper's scheme) the data is shuffled into ``members``
    folds and member ``m`` never sees fold ``m`` (with one member, or fewer samples than
    members, every member sees all data); with ``"bootstrap"`` each member trains on its own
    bootstrap resample. All members train at once as one batched network; Adam is per
    parameter, so this is exactly ``members`` independent fits.

    Everything is float64 and drawn from ``torch.Generator`` s seeded with
    :func:`derive_seed` of ``seed``: the same data and seed give the same predictions, so a
    search can refit the surrogate instead of storing it.
    """

    def __init__(
        self,
        *,
        members: int = 5,
        hidden: Sequence[int] = (64, 64),
        steps: int = 400,
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        loss: str = "l1",
        resample: str = "folds",
        seed: int = 0,
    ) -> None:
        self.members = check_int(members, "surrogate members", minimum=1,
                                 hint="the ensemble needs at least one MLP (the paper uses 5)")
        self.hidden = _check_hidden(hidden)
        self.steps = check_int(steps, "surrogate steps", minimum=1,
                               hint="the full-batch optimiser steps per fit, e.g. 400")
        self.lr = check_number(lr, "surrogate lr", above=0, finite=True, hint="e.g. lr=0.01")
        self.weight_decay = check_number(weight_decay, "surrogate weight_decay", minimum=0, finite=True,
                                         hint="e.g. weight_decay=1e-4 (0 disables it)")
        if loss not in ("l1", "mse"):
            raise ConfigError(f"unknown surrogate loss {loss!r}; use 'l1' (the paper's) or 'mse'")
        if resample not in ("folds", "bootstrap"):
            raise ConfigError(f"unknown surrogate resample {resample!r}; use 'folds' (each member leaves one fold "
                              "out, the paper's scheme) or 'bootstrap'")
        self.loss, self.resample = loss, resample
        self.seed = check_int(seed, "surrogate seed")
        self._params: list[torch.Tensor] | None = None

    @property
    def fitted(self) -> bool:
        return self._params is not None

    def _member_weights(self, n: int) -> torch.Tensor:
        """``[members, n]``: how often member ``m`` sees sample ``i`` in its loss."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "pnas-surrogate", self.resample))
        if self.resample == "bootstrap":
            draws = torch.randint(n, (self.members, n), generator=generator)
            return torch.zeros(self.members, n, dtype=torch.float64).scatter_add_(
                1, draws, torch.ones(self.members, n, dtype=torch.float64))
        weights = torch.ones(self.members, n, dtype=torch.float64)
        if self.members > 1 and n >= self.members:
            fold = torch.empty(n, dtype=torch.long)
            fold[torch.randperm(n, generator=generator)] = torch.arange(n) % self.members
            weights[fold.unsqueeze(0) == torch.arange(self.members).unsqueeze(1)] = 0.0
        return weights

    def _forward(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``[members, n]`` standardised predictions for standardised ``x`` of ``[n, d]``."""
        h = x.unsqueeze(0)
        for i in range(0, len(params) - 2, 2):
            h = torch.relu(h @ params[i] + params[i + 1])
        return (h @ params[-2] + params[-1]).squeeze(-1)

    def _matrix(self, X, what: str) -> torch.Tensor:
        x = torch.as_tensor(X, dtype=torch.float64)
        if x.dim() != 2:
            raise ConfigError(f"{what} must be a 2-D [candidates, features] array, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ConfigError(f"{what} holds NaN or infinite values; every feature must be a finite number")
        return x

    def fit(self, X, y) -> "Surrogate":
        """Fit every member from scratch to features ``X`` ``[n, d]`` and accuracies ``y`` ``[n]``."""
        x = self._matrix(X, "surrogate features X")
        t = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
        if len(t) != len(x) or len(x) == 0:
            raise ConfigError(f"surrogate fit needs one accuracy per candidate and at least one candidate, got "
                              f"{len(x)} feature rows and {len(t)} accuracies")
        if not torch.isfinite(t).all():
            raise ConfigError("surrogate accuracies hold NaN or infinite values; report a finite accuracy per "
                              "candidate")
        self._x_mean, self._x_std = x.mean(0), x.std(0, unbiased=False)
        self._x_std = torch.where(self._x_std > 0, self._x_std, torch.ones_like(self._x_std))
        self._y_mean, self._y_std = t.mean(), t.std(unbiased=False)
        if not self._y_std > 0:
            self._y_std = torch.ones((), dtype=torch.float64)
        xs, ts = (x - self._x_mean) / self._x_std, (t - self._y_mean) / self._y_std
        weights = self._member_weights(len(x))
        weights = weights / weights.sum(1, keepdim=True)

        generator = torch.Generator().manual_seed(derive_seed(self.seed, "pnas-surrogate", "init"))
        widths = [x.shape[1], *self.hidden, 1]
        params = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):  # PyTorch's default Linear init bound
            bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
            for shape in ((self.members, fan_in, fan_out), (self.members, 1, fan_out)):
                params.append(((torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
                              .requires_grad_())
        optimiser = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        with torch.enable_grad():
            for _ in range(self.steps):
                optimiser.zero_grad(set_to_none=True)
                error = self._forward(params, xs) - ts
                per_sample = error.abs() if self.loss == "l1" else error.square()
                (weights * per_sample).sum().backward()
                optimiser.step()
        self._params = [p.detach() for p in params]
        return self

    @torch.no_grad()
    def predict(self, X) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` over the members of the predicted accuracy, each ``[n]`` (float64)."""
        if self._params is None:
            raise ConfigError("the surrogate has not been fitted; call fit(X, y) with measured accuracies first")
        x = self._matrix(X, "surrogate features X")
        if x.shape[1] != self._x_mean.shape[0]:
            raise ConfigError(f"the surrogate was fitted on {self._x_mean.shape[0]} features but got {x.shape[1]}; "
                              "use the same features for fitting and predicting")
        out = self._forward(self._params, (x - self._x_mean) / self._x_std) * self._y_std + self._y_mean
        return out.mean(0), out.std(0, unbiased=False)


# --- the search state --------------------------------------------------------------------------

@dataclass(frozen=True)
class Level:
    """One level of a PNAS search: the candidates proposed for training and what the surrogate
    predicted for them *before* their accuracies were known (None at level 1, where there is
    no surrogate yet), how many admissible children were ranked (``children``) and how many
    the budget refused (``rejected``), then the measured ``accuracies`` (None until observed).
    """

    level: int
    proposed: tuple[Architecture, ...]
    predicted: tuple[float, ...] | None
    predicted_std: tuple[float, ...] | None
    children: int
    rejected: int
    accuracies: tuple[float, ...] | None = None

    @property
    def rank_correlation(self) -> float | None:
        """Spearman's rho between the predictions and the measured accuracies of this level's
        candidates (the paper's measure of the predictor); None before both exist, NaN when
        undefined (one candidate, or constant values)."""
        if self.predicted is None or self.accuracies is None:
            return None
        return rank_correlation(self.predicted, self.accuracies)

    def to_dict(self) -> dict:
        rho = self.rank_correlation
        return {
            "level": self.level,
            "proposed": [a.to_dict() for a in self.proposed],
            "labels": [a.label for a in self.proposed],
            "predicted": None if self.predicted is None else list(self.predicted),
            "predicted_std": None if self.predicted_std is None else list(self.predicted_std),
            "accuracies": None if self.accuracies is None else list(self.accuracies),
            "children": self.children,
            "rejected": self.rejected,
            "rank_correlation": None if rho is None or math.isnan(rho) else rho,
        }


class PNAS:
    """The state of a PNAS search over ``space`` for inputs of ``shape`` (Liu et al. 2018,
    Algorithm 1), driven by a procedure that trains the candidates::

        search = PNAS(space, shape, k=8, seed=0, admits=fits_device)
        while not search.done:
            candidates = search.propose()
            search.observe({arch: train_and_evaluate(arch) for arch in candidates})
        best_arch, best_accuracy = search.best()[0]

    * ``k``: the beam, candidates trained per level after the first;
    * ``admits(arch) -> bool``: a budget (e.g. a device's latency or memory); children it
      refuses are never proposed. If it refuses every one-block candidate the search cannot
      start (:class:`ConfigError`); if it refuses every child at a later level the search ends
      there and :attr:`stopped` says so;
    * ``features(arch) -> tensor``: extra surrogate features appended to
      :meth:`SearchSpace.features` (e.g. :class:`IndicatorFeatures`); computed once per
      candidate and cached;
    * ``first_level``: train only this many one-block candidates, a deterministic random
      subset (None: all of them, as the paper does);
    * ``levels``: the longest chain searched (None: the space's ``max_blocks``);
    * ``surrogate``: the :class:`Surrogate`'s settings (``members``, ``hidden``, ``steps``,
      ``lr``, ``weight_decay``, ``loss``, ``resample``; its defaults where left out), refit from
      scratch on every measured accuracy at each level with a seed derived from ``seed`` and
      the level.

    :attr:`history` holds one :class:`Level` per proposal, with the surrogate's predictions made
    before the accuracies were seen, so the procedure can report the surrogate's rank
    correlation level by level. The proposals are a pure function of the seed and the observed
    accuracies, so ``replay(stored_accuracies)`` on a fresh search resumes one.
    """

    def __init__(
        self,
        space: SearchSpace,
        shape: InputShape,
        *,
        k: int,
        seed: int,
        admits: Callable[[Architecture], bool] | None = None,
        features: Callable[[Architecture], torch.Tensor] | None = None,
        first_level: int | None = None,
        levels: int | None = None,
        surrogate: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(space, SearchSpace):
            raise ConfigError(f"space must be a SearchSpace, got {describe(space)}")
        if not isinstance(shape, InputShape):
            raise ConfigError(f"shape must be an InputShape, got {describe(shape)}")
        self.space, self.shape = space, shape
        self.k = check_int(k, "pnas k", minimum=1,
                           hint="k is how many candidates PNAS trains per level (the paper's beam, 256)")
        self.seed = check_int(seed, "pnas seed")
        for name, fn in (("admits", admits), ("features", features)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"pnas {name} must be a function of an Architecture (or None), got {describe(fn)}")
        self.admits, self.extra_features = admits, features
        self.first_level = check_int(first_level, "pnas first_level", minimum=1, optional=True,
                                     hint="how many one-block candidates to train (None: all of them)")
        self.levels = check_int(levels, "pnas levels", minimum=1, maximum=space.max_blocks, optional=True,
                                hint="the longest chain to search; this space allows at most "
                                     f"{space.max_blocks} blocks")
        if self.levels is None:
            self.levels = space.max_blocks
        if surrogate is not None and not isinstance(surrogate, Mapping):
            raise ConfigError(f"pnas surrogate must be a mapping of Surrogate settings (members, hidden, steps, lr, "
                              f"weight_decay, loss, resample), got {describe(surrogate)}")
        self._surrogate_settings = dict(surrogate or {})
        if "seed" in self._surrogate_settings:
            raise ConfigError("pnas surrogate settings take no seed: each refit's seed is derived from the search's seed")
        try:
            Surrogate(**self._surrogate_settings, seed=0)  # validate the settings now, not at level 2
        except TypeError as e:
            raise ConfigError(f"pnas surrogate: {e}; the settings are members, hidden, steps, lr, weight_decay, "
                              "loss and resample") from None
        self.history: list[Level] = []
        self.stopped: str | None = None
        self._observed: dict[Architecture, float] = {}
        self._features: dict[Architecture, torch.Tensor] = {}
        self._extra_width: int | None = None
        self._surrogate: Surrogate | None = None

    # -- state ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the search has nothing more to propose (:attr:`stopped` says why)."""
        return self.stopped is not None

    @property
    def level(self) -> int:
        """The level the next (or pending) proposal belongs to."""
        pending = self.history and self.history[-1].accuracies is None
        return len(self.history) if pending else len(self.history) + 1

    @property
    def observed(self) -> dict[Architecture, float]:
        """Every measured accuracy, in the order the candidates were proposed."""
        return dict(self._observed)

    @property
    def trained(self) -> int:
        return len(self._observed)

    def best(self, n: int = 1) -> list[tuple[Architecture, float]]:
        """The ``n`` best measured candidates as ``(architecture, accuracy)``, best first (ties:
        the earlier proposed)."""
        check_int(n, "n", minimum=1)
        ranked = sorted(enumerate(self._observed.items()), key=lambda item: (-item[1][1], item[0]))
        return [pair for _, pair in ranked[:n]]

    # -- features and the surrogate ---------------------------------------------------------

    def features(self, arch: Architecture) -> torch.Tensor:
        """The surrogate's input for ``arch``: :meth:`SearchSpace.features`, then the extra
        features if any (float64, cached)."""
        cached = self._features.get(arch)
        if cached is not None:
            return cached
        x = self.space.features(arch)
        if self.extra_features is not None:
            extra = self.extra_features(arch)
            try:
                extra = torch.as_tensor(extra, dtype=torch.float64).detach().cpu()
            except (TypeError, ValueError, RuntimeError):
                extra = None
            if extra is None or extra.dim() > 1 or not torch.isfinite(extra).all():
                raise ConfigError(f"pnas features({arch.label}) must return a 1-D tensor of finite numbers; "
                                  "replace NaN / infinite values (e.g. clamp a log condition number)")
            extra = extra.reshape(-1)
            if self._extra_width is None:
                self._extra_width = len(extra)
            elif len(extra) != self._extra_width:
                raise ConfigError(f"pnas features({arch.label}) returned {len(extra)} values but earlier candidates "
                                  f"got {self._extra_width}; return the same number of features for every candidate")
            x = torch.cat([x, extra])
        self._features[arch] = x
        return x

    def _matrix(self, archs: Sequence[Architecture]) -> torch.Tensor:
        return torch.stack([self.features(a) for a in archs])

    @property
    def surrogate(self) -> Surrogate:
        """The surrogate fitted to every accuracy observed so far (refit lazily after each
        level, with a seed derived from the search's seed and the number of levels observed)."""
        if not self._observed:
            raise ConfigError("the surrogate needs measured accuracies; observe the first level's results first")
        if self._surrogate is None:
            observed_levels = sum(level.accuracies is not None for level in self.history)
            seed = derive_seed(self.seed, "pnas", "surrogate", observed_levels)
            archs = list(self._observed)
            self._surrogate = Surrogate(**self._surrogate_settings, seed=seed).fit(
                self._matrix(archs), torch.tensor([self._observed[a] for a in archs], dtype=torch.float64))
        return self._surrogate

    def predict(self, archs: Sequence[Architecture]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of the current surrogate's predicted accuracy for ``archs`` (e.g. a
        held-out set, to track how well the surrogate ranks as the search proceeds)."""
        archs = list(archs)
        if not archs:
            empty = torch.zeros(0, dtype=torch.float64)
            return empty, empty
        return self.surrogate.predict(self._matrix(archs))

    # -- the loop ---------------------------------------------------------------------------

    def _admitted(self, archs: list[Architecture]) -> list[Architecture]:
        if self.admits is None:
            return archs
        kept = []
        for arch in archs:
            verdict = self.admits(arch)
            if not isinstance(verdict, (bool, np.bool_)):
                raise ConfigError(f"pnas admits({arch.label}) must return True or False, got {describe(verdict)}")
            if verdict:
                kept.append(arch)
        return kept

    def propose(self) -> list[Architecture]:
        """The candidates to train next: every admissible one-block candidate at level 1 (or
        ``first_level`` of them), then the ``k`` admissible children of the previous level's
        candidates that the surrogate predicts best. Calling it again before :meth:`observe`
        returns the same list; ``[]`` once :attr:`done`."""
        if self.done:
            return []
        if self.history and self.history[-1].accuracies is None:
            return list(self.history[-1].proposed)
        level = len(self.history) + 1
        if level == 1:
            roots = self.space.roots(self.shape)
            admitted = self._admitted(roots)
            if not admitted:
                raise ConfigError(
                    f"pnas admits refuses all {len(roots)} one-block candidates of the space, so the search cannot "
                    "start; loosen the budget (e.g. a larger latency / memory limit) or add smaller ops or widths "
                    "to the space")
            proposed = admitted
            if self.first_level is not None and self.first_level < len(admitted):
                generator = torch.Generator().manual_seed(derive_seed(self.seed, "pnas", "first-level"))
                chosen = sorted(torch.randperm(len(admitted), generator=generator)[: self.first_level].tolist())
                proposed = [admitted[i] for i in chosen]
            self.history.append(Level(1, tuple(proposed), None, None, len(admitted), len(roots) - len(admitted)))
            return list(proposed)
        if level > self.levels:
            self.stopped = f"reached {self.levels} blocks, the longest chain searched"
            return []
        parents = self.history[-1].proposed
        children = [child for parent in parents for child in self.space.expand(parent, self.shape)]
        if not children:
            self.stopped = (f"level {level}: none of the {len(parents)} level-{level - 1} candidates can grow by a "
                            "block in this space")
            return []
        admitted = self._admitted(children)
        if not admitted:
            self.stopped = (f"level {level}: admits refused all {len(children)} children of the {len(parents)} "
                            f"level-{level - 1} candidates; the search ended early at level {level - 1}")
            return []
        mean, std = self.predict(admitted)
        order = np.argsort(-mean.numpy(), kind="stable")[: self.k]
        proposed = tuple(admitted[i] for i in order)
        self.history.append(Level(level, proposed, tuple(float(mean[i]) for i in order),
                                  tuple(float(std[i]) for i in order), len(admitted), len(children) - len(admitted)))
        return list(proposed)

    def observe(self, results: Mapping[Architecture, float]) -> None:
        """Report the measured accuracy of every proposed candidate (a mapping from each
        architecture :meth:`propose` returned to its accuracy; calls :meth:`propose` first if
        it was not). The surrogate is refit before the next proposal."""
        if not isinstance(results, Mapping):
            raise ConfigError(f"observe takes a mapping from each proposed Architecture to its accuracy, got "
                              f"{describe(results)}")
        proposed = self.propose()
        if self.done:
            if not results:  # the loop's last round: propose() found nothing and ended the search
                return
            raise ConfigError(f"the search is done ({self.stopped}); there is nothing to observe")
        missing = [a.label for a in proposed if a not in results]
        extra = [a.label if isinstance(a, Architecture) else repr(a) for a in results if a not in set(proposed)]
        if missing or extra:
            raise ConfigError(
                f"observe needs exactly the {len(proposed)} candidates proposed for level {self.level}"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; not proposed: {', '.join(extra)}" if extra else "")
                + "; pass {arch: accuracy} for every architecture propose() returned")
        accuracies = tuple(float(check_number(results[a], f"accuracy of {a.label}", finite=True, numpy=True))
                           for a in proposed)
        for arch, accuracy in zip(proposed, accuracies):
            self._observed[arch] = accuracy
        last = self.history[-1]
        self.history[-1] = Level(last.level, last.proposed, last.predicted, last.predicted_std, last.children,
                                 last.rejected, accuracies)
        self._surrogate = None

    def replay(self, results: Mapping[Architecture, float]) -> int:
        """Resume: feed stored accuracies level by level for as long as they cover a whole
        proposal, and return how many levels were replayed. The proposals are recomputed, so
        they match the original run's exactly when the seed and settings are the same. The
        next :meth:`propose` is where the stored run stopped (stored accuracies of some of its
        candidates can be reused by the procedure instead of retraining)."""
        if not isinstance(results, Mapping):
            raise ConfigError(f"replay takes a mapping from Architecture to accuracy, got {describe(results)}")
        replayed = 0
        while not self.done:
            proposed = self.propose()
            if not proposed or any(a not in results for a in proposed):
                break
            self.observe({a: results[a] for a in proposed})
            replayed += 1
        return replayed


# --- TE-NAS indicators as extra surrogate features ---------------------------------------------

class IndicatorFeatures:
    """The TE-NAS indicators (Chen, Gong & Wang, ICLR 2021; :mod:`secateurs.analysis.indicators`)
    of a candidate at initialisation, as extra surrogate features for :class:`PNAS`: the log NTK
    condition number (trainability) and the fraction of ``inputs`` falling in distinct linear
    regions (expressivity), over ``repeats`` initialisations of :func:`.space.build`.

    Both cost no training, so they can tell the surrogate something about children no trained
    candidate resembles. ``inputs`` is a small batch of real images ``[n, C, H, W]`` (8 to 16
    keeps it cheap: the NTK needs ``n`` backward passes per candidate). Regions are counted on
    ``region_inputs`` (default: ``inputs``); a count saturates at the batch size, so a larger
    batch there (one forward pass, e.g. 128 images) keeps the fraction informative. A singular NTK (infinite
    condition number) is clamped to ``log(1 / (n * eps64))``, the largest condition number the
    float64 eigensolver can tell from singular, so the features stay finite. Each candidate's
    initialisations are seeded with :func:`derive_seed` of ``seed`` and its label; results are
    cached per candidate.
    """

    names = ("log_ntk_condition_number", "region_fraction")

    def __init__(self, shape: InputShape, inputs: torch.Tensor, *, region_inputs: torch.Tensor | None = None,
                 seed: int = 0, repeats: int = 1, batchnorm: bool = True) -> None:
        if not isinstance(shape, InputShape):
            raise ConfigError(f"shape must be an InputShape, got {describe(shape)}")
        if not isinstance(inputs, torch.Tensor) or tuple(inputs.shape[1:]) != (shape.channels, shape.size, shape.size) \
                or inputs.shape[0] < 2:
            got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else describe(inputs)
            raise ConfigError(f"indicator inputs must be a batch [n >= 2, {shape.channels}, {shape.size}, "
                              f"{shape.size}] of the search's images, got {got}")
        if region_inputs is not None and (not isinstance(region_inputs, torch.Tensor)
                                          or tuple(region_inputs.shape[1:]) != tuple(inputs.shape[1:])
                                          or region_inputs.shape[0] < 1):
            got = tuple(region_inputs.shape) if isinstance(region_inputs, torch.Tensor) else describe(region_inputs)
            raise ConfigError(f"indicator region_inputs must be a batch [n >= 1, {shape.channels}, {shape.size}, "
                              f"{shape.size}] of the search's images (or None: use inputs), got {got}")
        self.shape, self.inputs, self.region_inputs = shape, inputs, region_inputs
        self.seed = check_int(seed, "indicator seed")
        self.repeats = check_int(repeats, "indicator repeats", minimum=1)
        self.batchnorm = check_bool(batchnorm, "indicator batchnorm")
        self._cache: dict[Architecture, torch.Tensor] = {}

    def __call__(self, arch: Architecture) -> torch.Tensor:
        cached = self._cache.get(arch)
        if cached is not None:
            return cached
        n = self.inputs.shape[0]
        measured = indicators(lambda: build(arch, self.shape, batchnorm=self.batchnorm), self.inputs,
                              self.region_inputs, seed=derive_seed(self.seed, "pnas-indicators", arch.label),
                              repeats=self.repeats)
        cap = -math.log(n * torch.finfo(torch.float64).eps)
        log_kappa = min(measured["log_condition_number"], cap)
        x = torch.tensor([log_kappa, measured["regions"] / measured["region_samples"]], dtype=torch.float64)
        self._cache[arch] = x
        return x


def indicator_features(shape: InputShape, inputs: torch.Tensor | None = None, *, seed: int = 0, batch: int = 8,
                       region_inputs: torch.Tensor | None = None, region_batch: int = 64, repeats: int = 1,
                       batchnorm: bool = True) -> IndicatorFeatures:
    """:class:`IndicatorFeatures` for :class:`PNAS`'s ``features``. Pass a small batch of real
    images as ``inputs`` (TE-NAS measures on data); without one, ``batch`` standard-normal
    images (and ``region_batch`` more for the region count) are drawn from a generator seeded
    with :func:`derive_seed` of ``seed``, which keeps the library free of datasets but makes the
    indicators describe the network on noise rather than on the task's images."""
    if not isinstance(shape, InputShape):
        raise ConfigError(f"shape must be an InputShape, got {describe(shape)}")
    check_int(seed, "indicator seed")
    image = (shape.channels, shape.size, shape.size)
    if inputs is None:
        check_int(batch, "indicator batch", minimum=2, hint="images for the NTK; 8 to 16 keeps it cheap")
        generator = torch.Generator().manual_seed(derive_seed(seed, "pnas-indicators", "inputs"))
        inputs = torch.randn(batch, *image, generator=generator)
        if region_inputs is None:
            check_int(region_batch, "indicator region_batch", minimum=1, hint="images for the linear-region count")
            generator = torch.Generator().manual_seed(derive_seed(seed, "pnas-indicators", "region-inputs"))
            region_inputs = torch.randn(region_batch, *image, generator=generator)
    return IndicatorFeatures(shape, inputs, region_inputs=region_inputs, seed=seed, repeats=repeats,
                             batchnorm=batchnorm)
