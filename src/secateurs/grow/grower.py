"""Growing layers to target widths during training, one call per optimizer step.

Like a sparsifier, a :class:`Grower` is stepped right after ``optimizer.step()``; at its
growth steps it widens every target layer by its share of the remaining units (widths grow
linearly over ``events`` growth events, ``every`` steps apart, starting at step ``start``).
The optimizer keeps working on the grown parameters with their state padded (see
:mod:`secateurs.grow.widen`).

A checkpoint of a grown network only loads into a network of the same widths, so resuming
is two calls: :meth:`Grower.restore_widths` (grow to the saved widths, with placeholder
zeros) and then loading the model, optimizer and grower state as usual.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from ..outputs import batch_source
from ..validate import check_int
from .gradmax import GROWTH_INITS, ZERO_INCOMING, new_unit_weights
from .widen import add_units, growth_site

__all__ = ["Grower", "widths"]

_FORMAT = "secateurs.grower/1"


def widths(model: nn.Module, layers: Iterable[str]) -> dict[str, int]:
    """Output units of each named Linear / Conv layer."""
    out = {}
    for name in layers:
        w = model.get_submodule(name).weight
        out[name] = int(w.shape[0])
    return out


class Grower:
    """Widens ``targets`` (``{layer: final width}``) of ``model`` during training.

    Args:
        model, optimizer: the network and its optimizer (any ``torch.optim`` optimizer).
        example_input: a small batch of inputs; used to trace the model and to check that
            growing leaves its output unchanged.
        init: ``"gradmax"``, ``"gradmax_incoming"``, ``"random"`` or ``"zero"`` (see
            :mod:`secateurs.grow.gradmax`).
        start, every, events: the first growth step, the steps between growth events, and
            their number; each event adds ``1/events`` of the missing units (rounded so the
            last event reaches the targets exactly).
        batches: an iterable of ``(x, y)`` batches that can be iterated again, e.g. an
            unshuffled ``DataLoader`` (a zero-argument callable returning one is accepted too);
            GradMax measures its gradient matrix on the first ``grad_batches`` of each pass.
        scale: new vectors' norm as a multiple of the existing units' mean norm.
        bias: the bias of units grown with zero incoming weights (``gradmax``, ``zero``):
            positive so a ReLU starts in its linear part; the other inits use bias 0.
        seed: seeds the random directions.
        measure: after each growth, record the gradient norm of the new units' incoming and
            outgoing weights on the growth batches (one extra forward/backward).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        targets: Mapping[str, int],
        *,
        example_input: torch.Tensor,
        init: str = "gradmax",
        start: int = 0,
        every: int = 1,
        events: int = 1,
        batches: Optional[Iterable | Callable[[], Iterable]] = None,
        grad_batches: int = 1,
        scale: float = 0.5,
        bias: float = 1e-3,
        seed: int = 0,
        loss_fn: Callable = F.cross_entropy,
        measure: bool = False,
    ) -> None:
        if init not in GROWTH_INITS:
            raise ConfigError(f"unknown growth init {init!r}; known: {', '.join(GROWTH_INITS)}")
        for name, value in (("start", start), ("every", every), ("events", events), ("grad_batches", grad_batches)):
            check_int(value, f"Grower {name}", minimum=0 if name == "start" else 1)
        if not scale > 0:
            raise ConfigError(f"Grower scale must be > 0, got {scale!r}")
        if (init.startswith("gradmax") or measure) and batches is None:
            raise ConfigError(
                "GradMax growth (and measure=True) needs batches=<an iterable of (x, y) batches, e.g. a DataLoader>"
            )
        if not targets:
            raise ConfigError("Grower needs at least one {layer: target width}")
        self.model, self.optimizer = model, optimizer
        self.example = example_input
        self.init, self.start, self.every, self.events = init, start, every, events
        self.batches, self.grad_batches = batch_source(batches), grad_batches
        self.scale, self.bias, self.loss_fn, self.measure = scale, bias, loss_fn, measure
        self.generator = torch.Generator().manual_seed(seed)
        self.initial = widths(model, targets)
        self.targets = {k: int(v) for k, v in targets.items()}
        for name, width in self.targets.items():
            if width < self.initial[name]:
                raise ConfigError(f"target width {width} of {name!r} is below its current width {self.initial[name]}; growing never removes units")
            growth_site(model, name, example_input)  # fail now, not at the first growth step
        self.step_count = 0
        self.history: list[dict] = []

    # -- schedule ---------------------------------------------------------------------------
    def planned(self, event: int) -> dict[str, int]:
        """Widths after growth event ``event`` (1-based)."""
        return {name: self.initial[name] + ((self.targets[name] - self.initial[name]) * event) // self.events
                for name in self.targets}

    def event_at(self, step: int) -> Optional[int]:
        if step < self.start or (step - self.start) % self.every:
            return None
        event = (step - self.start) // self.every + 1
        return event if event <= self.events else None

    @property
    def finished(self) -> bool:
        return widths(self.model, self.targets) == self.targets

    # -- the training-loop call -------------------------------------------------------------
    def step(self) -> None:
        """Call after ``optimizer.step()``; grows at the scheduled steps."""
        self.step_count += 1
        event = self.event_at(self.step_count)
        if event is not None:
            self.grow(self.planned(event))

    def grow(self, planned: Mapping[str, int]) -> None:
        """Widen each layer (in order) to ``planned``."""
        for name, width in planned.items():
            site = growth_site(self.model, name, self.example)
            n = width - site.units
            if n <= 0:
                continue
            was_training = self.model.training
            need = self.init.startswith("gradmax") or self.measure
            batches = list(itertools.islice(self.batches(), self.grad_batches)) if need else None
            incoming, outgoing = new_unit_weights(
                self.model, site, n, self.init, scale=self.scale, bias=self.bias, batches=batches,
                example_input=self.example, generator=self.generator, loss_fn=self.loss_fn,
            )
            add_units(self.model, site, n, incoming=incoming, outgoing=outgoing,
                      bias=self.bias if self.init in ZERO_INCOMING else 0.0,
                      optimizer=self.optimizer, example_input=self.example)
            self.model.train(was_training)
            record = {"step": self.step_count, "layer": name, "added": n, "width": width}
            if self.measure:
                record["grad_norm"] = self._new_weight_grad_norm(name, n, batches)
            self.history.append(record)

    def _new_weight_grad_norm(self, name: str, n: int, batches: list) -> float:
        """L2 norm of the loss gradient w.r.t. the ``n`` newest units' incoming and outgoing
        weights (mean loss over ``batches``); every ``.grad`` is cleared afterwards."""
        site = growth_site(self.model, name, self.example)
        producer, reader = self.model.get_submodule(name), self.model.get_submodule(site.consumer)
        for x, y in batches:
            (self.loss_fn(self.model(x), y) / len(batches)).backward()
        cols = n if reader.weight.dim() > 2 else n * site.positions
        norm = torch.cat([producer.weight.grad[-n:].flatten(), reader.weight.grad[:, -cols:].flatten()]).norm()
        for p in self.model.parameters():
            p.grad = None
        return float(norm)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"format": _FORMAT, "step": self.step_count, "widths": widths(self.model, self.targets),
                "initial": dict(self.initial), "targets": dict(self.targets), "history": [dict(h) for h in self.history],
                "generator": self.generator.get_state()}

    def _check(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise CheckpointError("not a Grower state (missing format secateurs.grower/1)")
        if state["targets"] != self.targets or state["initial"] != self.initial:
            raise CheckpointError(
                f"the checkpoint grows {state['initial']} -> {state['targets']}, this grower "
                f"{self.initial} -> {self.targets}; resume with the same model and targets"
            )

    def restore_widths(self, state: Mapping) -> None:
        """Grow the model (zeros) to the widths saved in ``state`` so its checkpoint loads."""
        self._check(state)
        for name, width in state["widths"].items():
            site = growth_site(self.model, name, self.example)
            if width > site.units:
                add_units(self.model, site, width - site.units, optimizer=self.optimizer)

    def load_state_dict(self, state: Mapping) -> None:
        self._check(state)
        current = widths(self.model, self.targets)
        if current != state["widths"]:
            raise CheckpointError(
                f"the model has widths {current} but the checkpoint {state['widths']}; "
                "call Grower.restore_widths(state) before loading the model"
            )
        self.step_count = int(state["step"])
        self.history = [dict(h) for h in state["history"]]
        self.generator.set_state(state["generator"])
