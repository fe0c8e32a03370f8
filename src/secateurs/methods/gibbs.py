"""Gibbs pruning (Labach & Valaee, "A Framework for Neural Network Pruning Using Gibbs
Distributions", GLOBECOM 2020, arXiv 2006.04981): train and prune at once, with masks drawn
from a Gibbs distribution ``p(m) ∝ exp(-H(m; w) / T)`` over a Hamiltonian of the weights,
while the temperature ``T`` is annealed towards zero, where the distribution concentrates on
the Hamiltonian's minimum.

What is implemented here, exactly
---------------------------------
Per prunable layer with weights ``w`` (``n`` of them) and target sparsity ``p``:

* **Energy scale.** ``e_i = w_i^2 / mean(w^2)`` -- squared magnitudes *normalised by the
  layer's mean*. (Choice: the authors' code uses the raw ``w^2`` with an inverse temperature
  from 1 to 1e4; raw ``w^2`` makes the temperature's meaning depend on the layer's scale --
  LeNet-300-100's ``w^2 ~ 4e-4`` stays random at ``beta = 1e4`` -- so here ``T`` is in units
  of the layer's mean ``w^2`` and one schedule suits every layer and model.)
* **Threshold.** ``q`` sits midway between the largest energy the ground state prunes and the
  smallest it keeps, with ``k = keep_count(n, p)`` kept, so the Hamiltonian's minimum keeps
  exactly ``k``. (The authors take the ``p``-th percentile of ``w^2``, linearly interpolated;
  for two weights at p = 0.5 both are the mean.)
* **Unstructured Hamiltonian** over masks ``m_i ∈ {0, 1}``:
  ``H(m) = Σ_i (q - e_i) m_i``. It factorises, so the Gibbs distribution is independent
  Bernoulli draws, sampled exactly: ``P(m_i = 1) = sigmoid((e_i - q) / T)``.
* **Structured ("filter") Hamiltonian**: the groups are the layer's output units (a conv
  filter, a linear neuron: one row of :func:`~secateurs.layers.as_rows`), the threshold ``q``
  is placed the same way among the *group means* of ``e`` (so the aligned minimum keeps the
  ``keep_count(groups, p)`` groups of largest mean ``w^2``), and with spins ``x = 2m - 1``
  ``H(m) = Σ_i (q - e_i) m_i - (c / n_g) Σ_g Σ_{i≠j ∈ g} x_i x_j``: a ferromagnetic
  all-to-all coupling ``c`` (``coupling``) inside each group pulls a group's weights to one
  mask value. (The authors couple kernel positions within each ``(in, out)`` kernel exactly
  and the channel halves through their sums; the all-to-all coupling over the whole output
  unit, scaled by ``1 / n_g`` so it grows like the field term, is this library's choice.)
* **Sampling (structured).** The coupling depends on ``x`` only through ``S_g = Σ x_i``, so a
  Gaussian auxiliary variable (Hubbard-Stratonovich) gives an exact block Gibbs sampler over
  all weights at once: with ``β = 1/T`` and ``K = βc / n_g``, draw
  ``z_g ~ N(2 K S_g, 2 K)``, then every ``m_i ~ Bernoulli(sigmoid(2 z_g - β (q - e_i)))``
  independently. ``sweeps`` such rounds per resample, started from the current mask (a
  persistent chain: the temperature changes little between resamples), each followed by a
  Metropolis proposal to flip the whole group (``m -> 1 - m``, which leaves the coupling
  unchanged, so ``ΔH = Σ h_i (1 - 2 m_i)``): with a strong coupling the local moves almost
  never cross between a group's all-on and all-off modes. The authors run chromatic Gibbs
  sweeps (20-50) started from the deterministic filter mask instead; both moves here leave
  the Gibbs distribution invariant.
* **Annealing.** :class:`~secateurs.schedules.GeometricCooling`: ``T`` goes from
  ``temperature`` (1.0) to ``final_temperature`` (1e-3) geometrically between step 0 and
  ``end`` (the authors' ``beta = logspace(0, 4)``, one value per epoch; here per step).
  A new mask is drawn every ``every`` steps (1: every step, as the authors draw one per
  forward pass).
* **Training with sampled masks.** A masked weight keeps its value: the sparsifier holds a
  dense copy, writes ``w * m`` into the model, and after each optimizer step copies back only
  the active weights -- the same training as a forward pass through ``w * m`` (a masked weight
  gets no update). Choice: a masked weight's optimizer state (momentum) is zeroed, so a
  revived weight restarts it.
* **Exact final sparsity.** At step ``end`` (default: the last step) the mask is fixed to the
  deterministic ``T → 0`` limit of the distribution -- the Hamiltonian's minimum: unstructured,
  the ``k`` largest ``|w|`` of each layer (ties to the lowest index), through the library's
  allocation and engine, which check every layer's count; structured, the
  ``keep_count(groups, p)`` output units of largest mean ``w^2`` whole, each layer's count
  checked. Training after ``end`` keeps that mask. The sampled masks before it are not
  exact (their *expected* sparsity tends to ``p`` as ``T → 0``); the authors' code never
  fixes the mask and reports the sampled one.
* **Per layer**, as the authors (every layer at sparsity ``p``; ``keep_dense`` /
  ``layer_sparsity`` set other layers' own ``p``). The structured variant removes the output
  units of every prunable layer, the classifier's too: exclude it (``exclude=["fc3.weight"]``).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from ..allocation import check_sparsity, keep_count
from ..errors import ConfigError
from ..layers import as_rows, from_rows
from ..schedules import GeometricCooling
from ..scores import magnitude
from ..selection import topk_mask
from ..validate import check_int, check_number
from .during import _DuringTraining
from .registry import METHODS

HAMILTONIANS = ("unstructured", "filter")


def normalized_energy(w: torch.Tensor) -> torch.Tensor:
    """``w^2 / mean(w^2)`` in float32 (all ones for an all-zero tensor)."""
    e = w.detach().float() ** 2
    scale = e.mean()
    return e / scale if scale > 0 else torch.ones_like(e)


def threshold(values: torch.Tensor, keep: int) -> torch.Tensor:
    """A cut between the ``keep`` largest ``values`` and the rest: the midpoint of the
    smallest kept and the largest dropped (beyond the extremes for ``keep`` 0 or all)."""
    flat = values.reshape(-1)
    if keep >= flat.numel():
        return flat.min() - 1.0
    if keep <= 0:
        return flat.max() + 1.0
    n = flat.numel()  # the (n - keep)-th smallest is the largest dropped, the next the smallest kept
    dropped = torch.kthvalue(flat, n - keep).values
    kept = flat[flat >= dropped]
    smallest_kept = torch.kthvalue(kept, kept.numel() - keep + 1).values if kept.numel() > keep else kept.min()
    return (dropped + smallest_kept) / 2


def sample_unstructured(energy: torch.Tensor, q: torch.Tensor, temperature: float,
                        generator: torch.Generator) -> torch.Tensor:
    """One exact draw of ``H(m) = Σ (q - e_i) m_i`` at ``temperature``: independent
    ``m_i ~ Bernoulli(sigmoid((e_i - q) / T))``."""
    p = torch.sigmoid((energy - q) / temperature)
    return torch.rand(p.shape, generator=generator, device=p.device) < p


def sample_filter(fields: torch.Tensor, mask: torch.Tensor, temperature: float, coupling: float, sweeps: int,
                  generator: torch.Generator) -> torch.Tensor:
    """``sweeps`` rounds of the auxiliary-variable Gibbs sampler for
    ``H(m) = Σ h_i m_i - (c / n) Σ_{i≠j in a row} x_i x_j`` (``x = 2m - 1``), one group per
    row of ``fields`` (``h``, shape ``[groups, n]``), started from ``mask`` (same shape)."""
    beta = 1.0 / temperature
    n = fields.shape[1]
    k = beta * coupling / n
    m = mask
    for _ in range(sweeps):
        s = (2 * m.float() - 1).sum(dim=1)
        noise = torch.randn(s.shape, generator=generator, device=fields.device)
        z = 2 * k * s + math.sqrt(2 * k) * noise
        p = torch.sigmoid(2 * z[:, None] - beta * fields)
        m = torch.rand(p.shape, generator=generator, device=fields.device) < p
        # the whole-group flip m -> 1 - m leaves the coupling (a function of S^2) unchanged:
        # a Metropolis move with dH = Σ h_i (1 - 2 m_i) that jumps between the aligned
        # on/off modes, which the local moves cross only at an exponentially small rate
        dh = (fields * (1 - 2 * m.float())).sum(dim=1)
        accept = torch.rand(dh.shape, generator=generator, device=fields.device) < torch.exp(-beta * dh).clamp(max=1.0)
        m = torch.where(accept[:, None], ~m, m)
    return m


@METHODS.register("gibbs", "masks sampled from an annealed Gibbs distribution, trained and pruned at once (Labach & Valaee 2020)")
class GibbsPruning(_DuringTraining):
    """Gibbs pruning (Labach & Valaee 2020); the formulation and the choices made are in
    this module's docstring. ``hamiltonian`` is ``"unstructured"`` (weights) or ``"filter"``
    (whole output units: conv filters, linear neurons, with ``coupling`` ``c``);
    ``temperature`` -> ``final_temperature`` is the geometric cooling up to ``end``, where
    the mask is fixed exactly at ``sparsity``; a mask is drawn every ``every`` steps
    (``sweeps`` sampler rounds each, structured only)."""

    warn_dense_step = False
    _plan_fields = ("hamiltonian", "coupling", "sweeps", "cooling", "every_steps")

    def __init__(self, model, optimizer=None, *, sparsity: float, total_steps: int, steps_per_epoch: int | None = None,
                 hamiltonian: str = "unstructured", temperature: float = 1.0, final_temperature: float = 1e-3,
                 end="100%", every=1, coupling: float = 1.0, sweeps: int = 5, scope: str = "uniform", **kwargs):
        self._length(total_steps, steps_per_epoch)
        check_sparsity(sparsity)
        if sparsity == 0:
            raise ConfigError("Gibbs pruning sparsity 0 prunes nothing; give the target sparsity, e.g. sparsity=0.9")
        if hamiltonian not in HAMILTONIANS:
            raise ConfigError(f"Gibbs pruning hamiltonian must be one of {', '.join(HAMILTONIANS)}, got {hamiltonian!r}; "
                              "'unstructured' prunes weights, 'filter' whole output units (filters / neurons)")
        if scope != "uniform":
            raise ConfigError(f"Gibbs pruning sets each layer's threshold from its own weights (per layer, as the paper), "
                              f"so scope must be 'uniform', got {scope!r}; remove prune.scope or set it to uniform")
        check_number(coupling, "Gibbs pruning coupling", above=0.0, finite=True,
                     hint="the ferromagnetic coupling c inside each filter/neuron, e.g. 1.0")
        check_int(sweeps, "Gibbs pruning sweeps", minimum=1, hint="sampler rounds per mask draw, e.g. 5")
        self.hamiltonian, self.coupling, self.sweeps = hamiltonian, float(coupling), sweeps
        self.end_step = self._steps(end, "end")
        if self.end_step < 1:
            raise ConfigError(f"Gibbs pruning end={end!r} is step 0: the temperature needs steps to cool; "
                              "use a later end, e.g. '100%'")
        self.every_steps = self._steps(every, "every")
        if not 1 <= self.every_steps <= self.end_step:
            raise ConfigError(f"Gibbs pruning every={every!r} must be between 1 step and end ({self.end_step} steps), "
                              f"got {self.every_steps}; e.g. every=1 draws a mask every step")
        self.cooling = GeometricCooling(initial=temperature, final=final_temperature, start=0, end=self.end_step)
        super().__init__(model, optimizer, score=magnitude, sparsity=sparsity, scope="uniform", **kwargs)
        self.finished = False
        with torch.no_grad():
            self.dense = {n: p.detach().clone() for n, p in self.masks.params.items()}
            self._draw(self.cooling.temperature_at(0), kind="sample")

    # -- the distribution -------------------------------------------------------------------
    def layer_targets(self) -> dict[str, float]:
        return {n: self.fixed_sparsity.get(n, self.target) for n in self.masks.names()}

    def _group_keep(self, name: str, sparsity: float) -> int:
        groups = as_rows(self.masks.masks[name], self._axis(name)).shape[0]
        return keep_count(groups, sparsity)

    def _axis(self, name: str) -> int:
        axis = self.masks.output_axes[name]
        return 0 if axis is None else axis

    def sample(self, temperature: float, weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """One draw of every layer's mask from the Gibbs distribution at ``temperature`` over
        ``weights`` (default: the dense copy), changing nothing."""
        check_number(temperature, "temperature", above=0.0, finite=True)
        weights = self.dense if weights is None else weights
        out = {}
        for name, p in self.layer_targets().items():
            energy = normalized_energy(weights[name])
            if p == 0:
                out[name] = torch.ones_like(energy, dtype=torch.bool)
            elif self.hamiltonian == "unstructured":
                q = threshold(energy, keep_count(energy.numel(), p))
                out[name] = sample_unstructured(energy, q, temperature, self.generator)
            else:
                axis = self._axis(name)
                rows = as_rows(energy, axis)
                q = threshold(rows.mean(dim=1), self._group_keep(name, p))
                start = as_rows(self.masks.masks[name], axis)
                m = sample_filter(q - rows, start, temperature, self.coupling, self.sweeps, self.generator)
                out[name] = from_rows(m, energy.shape, axis)
        return out

    # -- training ---------------------------------------------------------------------------
    def step(self) -> None:
        if self._step_check:
            self._check_step()
        self.steps += 1
        t = self.steps
        if self.finished or (t % self.every_steps and t != self.end_step):
            self.masks.enforce_(self.optimizer)
            return
        with torch.no_grad():
            self.masks.enforce_(self.optimizer)  # this step's update of masked weights is void
            for name, p in self.masks.params.items():
                self.dense[name] = torch.where(self.masks.masks[name], p.detach(), self.dense[name])
            if t >= self.end_step:
                self._finish()
            else:
                self._draw(self.cooling.temperature_at(t), kind="sample")

    def _write(self, new: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> None:
        """Make ``new`` the masks (each layer's count checked against ``counts``) and put the
        dense values of the active weights back into the model."""
        self.masks.update_(new, counts)
        for name, p in self.masks.params.items():
            p.copy_(self.dense[name])
        self.masks.sync_()
        self.masks.enforce_(self.optimizer)

    def _draw(self, temperature: float, kind: str) -> None:
        new = self.sample(temperature)
        counts = dict(zip(new, (int(c) for c in torch.stack([m.sum() for m in new.values()]).tolist())))
        self._write(new, counts)
        t = self.steps
        if t % max(self.every_steps, self.end_step // 100) == 0:  # about 100 history entries per run
            self._record(kind, self.target, temperature=temperature)

    def ground_state(self) -> dict[str, torch.Tensor]:
        """The ``T → 0`` mask of the dense copy, with every layer's exact count: the minimum
        of the Hamiltonian (see the module docstring)."""
        out = {}
        for name, p in self.layer_targets().items():
            energy = normalized_energy(self.dense[name])
            if self.hamiltonian == "unstructured":
                out[name] = topk_mask(energy, keep_count(energy.numel(), p))
            else:
                axis = self._axis(name)
                rows = as_rows(energy, axis)
                keep = topk_mask(rows.mean(dim=1), self._group_keep(name, p))
                out[name] = from_rows(keep[:, None].expand_as(rows), energy.shape, axis)
        return out

    def _finish(self) -> None:
        """Fix the mask to the Hamiltonian's minimum at the exact target sparsity."""
        numel = self.masks.numel()
        if self.hamiltonian == "unstructured":
            # every weight active with its dense value, then the library's allocation + engine
            self._write({n: torch.ones_like(m) for n, m in self.masks.masks.items()}, numel)
            self._prune(self.target, self.score, "uniform")
        else:
            new = self.ground_state()
            counts = {}
            for name, p in self.layer_targets().items():
                rows = as_rows(self.masks.masks[name], self._axis(name)).shape
                counts[name] = self._group_keep(name, p) * rows[1]
            self._write(new, counts)
            self._record("prune", self.target)
        self.finished = True

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        # the dense copy with the active weights as trained since the last draw
        dense = {n: torch.where(self.masks.masks[n], p.detach(), self.dense[n]).to("cpu", copy=True)
                 for n, p in self.masks.params.items()}
        state["gibbs"] = {"dense": dense, "finished": self.finished}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        saved = state.get("gibbs")
        if saved is None:
            raise ConfigError("this sparsifier state has no Gibbs pruning part (the dense weights); "
                              "resume it with the method that saved it")
        self.dense = {n: saved["dense"][n].to(self.masks.params[n].device) for n in self.masks.names()}
        self.finished = bool(saved["finished"])
        with torch.no_grad():  # the model as saved: the dense values where the saved mask is on
            for name, p in self.masks.params.items():
                p.copy_(self.dense[name])
            self.masks.apply_()
