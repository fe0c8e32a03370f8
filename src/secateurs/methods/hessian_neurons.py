"""Neuron pruning during training from scratch, guided by the Hessian's spectral radius.

The idea comes from Ebrahimi & Klabjan, "Neuron-based Pruning of Deep Neural Networks with
Better Generalization using Kronecker Factored Curvature Approximation" (arXiv:2111.08577,
2021): train and prune neurons at once, from scratch, steering by the spectral radius of the
Hessian (they approximate it with K-FAC). Their exact algorithm is not reproduced here (we
could read only the abstract); what follows is **our formulation**, with the exact
spectral radius from Hessian-vector products instead of K-FAC:

* Neurons are the output units of every ``nn.Linear`` / ``nn.Conv*d`` except the last such
  layer (the classifier): row ``i`` of the weight and ``bias[i]``. A removed neuron's row and
  bias are held at zero (and their optimizer state), so with a zero-preserving activation
  (ReLU) it outputs zero and :func:`secateurs.structured.compact_zero_channels` can remove it
  physically.
* The number of removed neurons follows a cubic schedule (Zhu & Gupta 2017) from 0 at
  ``start`` to exactly ``round(ratio * neurons)`` at ``end``, updated every ``every`` steps.
* At an update, on that step's batch: the gradient ``g`` and the spectral radius
  ``rho = |lambda_max(H)|`` by power iteration (:mod:`secateurs.analysis.hessian`). Removing
  neuron ``i`` (its parameters ``theta_i`` -> 0) changes the loss by
  ``-g_i . theta_i + 1/2 theta_i^T H theta_i <= -g_i . theta_i + rho/2 ||theta_i||^2``.
  The neurons with the smallest bound go first (global ranking: the bound is in loss units,
  so layers compare directly). ``rho`` sets the trade-off between the first-order term and
  the neuron's size: in a sharp region (large rho) large neurons are expensive to remove.

``criterion="l1"`` is the baseline on the same schedule: each neuron's incoming L1 norm,
divided by its layer's mean (as :func:`secateurs.structured.l1_importance`).

Not a :class:`~secateurs.methods.base.Sparsifier` and not in ``METHODS``: a sparsifier's
target is a weight sparsity, which the ``secateurs train`` sweep checks at the end of each
level; a neuron ratio is another target (a neuron of fan-in 784 and one of fan-in 300 carry
different weight counts), and ``secateurs structured`` prunes a trained network, not during
training. The recipe is this class plus the loop in ``reproductions/hessian-neurons-mnist``.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.hessian import model_hessian, top_eigenvalue
from ..errors import ConfigError
from ..layers import as_rows, layer_type, notice, unregistered_matrix_modules
from ..schedules import cubic_sparsity
from ..validate import check_int, check_number

__all__ = ["HessianNeuronPruning", "CRITERIA"]

CRITERIA = ("hessian", "l1")


class HessianNeuronPruning:
    """Prunes ``ratio`` of the hidden neurons of ``model`` while it trains; call
    :meth:`step` after every ``optimizer.step()`` with that step's ``(x, y)`` batch.

    Args:
        ratio: share of the hidden neurons removed by ``end`` (0 <= ratio < 1).
        total_steps: training steps; ``start`` / ``end`` default to 0 and half of them.
        every: steps between updates of the removed set.
        criterion: ``"hessian"`` (the spectral-radius bound above) or ``"l1"``.
        loss_fn: ``loss_fn(model(x), y)``, the training loss the Hessian is taken of.
        power_iters / tol / seed: power iteration's cap, relative tolerance and start seed.
        min_neurons: neurons every layer keeps.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, ratio: float,
                 total_steps: int, start: int = 0, end: int | None = None, every: int = 50,
                 criterion: str = "hessian", loss_fn: Callable = F.cross_entropy, power_iters: int = 20,
                 tol: float = 1e-3, seed: int = 0, min_neurons: int = 1):
        check_int(total_steps, "total_steps", minimum=1, hint="the number of training steps")
        end = total_steps // 2 if end is None else end
        check_int(start, "start", minimum=0)
        check_int(end, "end", minimum=0)
        for what, v in (("every", every), ("min_neurons", min_neurons), ("power_iters", power_iters)):
            check_int(v, what, minimum=1)
        if not 0 <= start < end <= total_steps:
            raise ConfigError(f"need 0 <= start < end <= total_steps, got start={start}, end={end}, total_steps="
                              f"{total_steps}; the schedule must reach the target before training ends")
        if criterion not in CRITERIA:
            raise ConfigError(f"unknown criterion {criterion!r}; known: {', '.join(CRITERIA)}")
        check_number(ratio, "ratio", minimum=0, below=1, hint="the share of hidden neurons to remove")
        # every layer type the registry knows (Linear, Conv, transformers' Conv1D, yours), never a
        # hand-picked isinstance list; matrix modules it does not know are named, not skipped silently
        layers = [(n, m) for n, m in model.named_modules() if layer_type(m) is not None]
        unseen = unregistered_matrix_modules(model)
        if unseen:
            notice("neuron pruning leaves layers of types the layer registry does not know unpruned: "
                   + ", ".join(f"{n} ({t})" for n, t in unseen[:4]) + "; secateurs.register_layer(...) makes them prunable")
        if len(layers) < 2:
            raise ConfigError(f"{type(model).__name__} has {len(layers)} registered layer(s); neuron pruning needs "
                              "hidden layers (every registered layer but the last, the output layer, is pruned)")
        self.model, self.optimizer = model, optimizer
        self.layers = dict(layers[:-1])
        self.kinds = {n: layer_type(m) for n, m in self.layers.items()}
        self.alive = {n: torch.ones(self._weight(n).shape[self.kinds[n].output_axis], dtype=torch.bool,
                                    device=self._weight(n).device) for n in self.layers}
        self.neurons = sum(int(a.numel()) for a in self.alive.values())
        self.target = round(ratio * self.neurons)
        room = sum(max(0, int(a.numel()) - min_neurons) for a in self.alive.values())
        if self.target > room:
            raise ConfigError(f"ratio {ratio} removes {self.target} of {self.neurons} neurons, but keeping "
                              f"min_neurons={min_neurons} per layer allows at most {room}; lower the ratio")
        self.ratio, self.total_steps, self.start, self.end, self.every = ratio, total_steps, start, end, every
        self.criterion, self.loss_fn, self.power_iters, self.tol, self.seed = criterion, loss_fn, power_iters, tol, seed
        self.min_neurons = min_neurons
        self.steps = 0
        self.history: list[dict] = []

    def _weight(self, name: str) -> torch.Tensor:
        return getattr(self.layers[name], self.kinds[name].param)

    def _rows(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the layer's weight) as one row per output neuron."""
        return as_rows(t, self.kinds[name].output_axis)

    def _bias(self, name: str) -> torch.Tensor | None:
        bias = getattr(self.layers[name], "bias", None)
        return bias if isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.numel() == self.alive[name].numel() else None

    # -- schedule ----------------------------------------------------------------------
    def removed_at(self, t: int) -> int:
        """Neurons removed after step ``t`` (cubic from ``start`` to ``end``)."""
        # the shared Zhu & Gupta cubic (GMP's), as a fraction of the target count
        return self.target if t >= self.end else round(self.target * cubic_sparsity(t, 0.0, 1.0, self.start, self.end))

    def updates_at(self, t: int) -> bool:
        return self.start < t <= self.end and ((t - self.start) % self.every == 0 or t == self.end)

    @property
    def removed(self) -> int:
        return sum(int((~a).sum()) for a in self.alive.values())

    # -- the call ------------------------------------------------------------------------
    def step(self, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """After ``optimizer.step()``: re-zero removed neurons, and at an update remove more."""
        self.steps += 1
        t = self.steps
        if self.updates_at(t) and self.removed_at(t) > self.removed:
            self._update(self.removed_at(t) - self.removed, batch)
        self.enforce_()

    def _update(self, count: int, batch) -> None:
        info: dict = {"step": self.steps}
        if self.criterion == "hessian":
            if batch is None:
                raise ConfigError("criterion='hessian' needs this step's batch: call step((x, y)) at every step")
            x, y = batch
            began = time.perf_counter()
            was = self.model.training
            op = model_hessian(self.model, self.loss_fn, x, y)
            eig = top_eigenvalue(op, max_iter=self.power_iters, tol=self.tol, seed=self.seed)
            self.model.train(was)
            info.update(rho=eig.spectral_radius, eigenvalue=eig.eigenvalue, iterations=eig.iterations,
                        converged=eig.converged, hessian_s=time.perf_counter() - began)
            grads = dict(zip(op.names, torch.split(op.gradient, [p.numel() for p in op.params])))
            scores = self._bound_scores(grads, eig.spectral_radius)
        else:
            scores = self._l1_scores()
        self._remove(scores, count)
        info["removed"] = {n: int((~a).sum()) for n, a in self.alive.items()}
        self.history.append(info)

    @torch.no_grad()
    def _bound_scores(self, grads: dict, rho: float) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = {}
        for name in self.layers:
            weight = self._weight(name)
            w = self._rows(name, weight)
            g = self._rows(name, grads[names[id(weight)]].view_as(weight))
            first, size = (g * w).sum(1), w.pow(2).sum(1)
            bias = self._bias(name)
            if bias is not None:
                gb = grads[names[id(bias)]]
                first, size = first + gb * bias, size + bias.pow(2)
            out[name] = -first + 0.5 * rho * size
        return out

    @torch.no_grad()
    def _l1_scores(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.layers:
            s = self._rows(name, self._weight(name)).abs().sum(1)
            alive = self.alive[name]
            out[name] = s / s[alive].mean().clamp_min(1e-12)
        return out

    def _remove(self, scores: dict[str, torch.Tensor], count: int) -> None:
        """Remove the ``count`` alive neurons with the lowest score, keeping ``min_neurons``
        per layer (a neuron whose removal would break that is skipped for the next)."""
        entries = sorted((float(s), name, i) for name, sc in scores.items()
                         for i, s in enumerate(sc.tolist()) if self.alive[name][i])
        left = {n: int(a.sum()) for n, a in self.alive.items()}
        done = 0
        for _, name, i in entries:
            if done == count:
                break
            if left[name] > self.min_neurons:
                self.alive[name][i] = False
                left[name] -= 1
                done += 1
        assert done == count, "the constructor checked that min_neurons leaves room"

    @torch.no_grad()
    def enforce_(self) -> None:
        """Zero removed neurons' weights rows, biases and their optimizer state."""
        for name in self.layers:
            dead = (~self.alive[name]).nonzero().squeeze(1)
            if not dead.numel():
                continue
            for p, axis in ((self._weight(name), self.kinds[name].output_axis), (self._bias(name), 0)):
                if p is None:
                    continue
                p.index_fill_(axis, dead, 0)
                state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
                for v in state.values():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        v.index_fill_(axis, dead, 0)

    def stats(self) -> dict:
        return {"neurons": self.neurons, "removed": self.removed, "ratio": self.removed / self.neurons,
                "alive": {n: int(a.sum()) for n, a in self.alive.items()}}

