"""Grow-and-prune architecture search for an MLP, with fixed baselines (``run_grow_prune``).

The search (:mod:`secateurs.grow.heuristic`) starts from an MLP of hidden widths ``start``
and runs ``cycles`` training phases of ``train.epochs`` each; between two phases one event
prunes, maybe deepens and grows the network, so there are ``cycles - 1`` events and the last
phase trains the final architecture. Every phase has a fresh optimizer (the event returns new
parameters, so momentum / Adam moments start from zero), seeded per cycle.

Two networks are then trained from scratch for the same total epochs (``cycles *
train.epochs``) with the same optimizer settings: an MLP with the *final* searched widths
("fixed": is the search better than simply training what it found?) and the reference model
``model`` (LeNet-300-100 by default, 266k parameters).

Resuming: after each event ``checkpoints/event-C.pt`` holds the new widths, the weights,
the search state (its generator) and the cycle's record. A re-run rebuilds ``MLP(widths)``
from the last event file, loads its weights and carries on with the next cycle, whose
per-epoch checkpoint ``checkpoints/cycle-C.pt`` resumes an unfinished phase; finished cycles
and baselines are never trained again.

Outputs: ``results.json``, ``grow_prune.md`` (:func:`format_grow_prune`) and
``grow_prune.png`` (parameters and accuracy along the search).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ..data import ImageDataset
from ..errors import ConfigError
from ..grow.deepen import mlp_layout
from ..grow.heuristic import GrowPrune, GrowPruneConfig, mlp_parameters
from ..models import MLP
from ..train import Trainer, load_checkpoint, save_checkpoint
from ..validate import check_int
from .config import DataConfig, HashedConfig, ModelConfig, PhaseConfig, load_typed
from .runs import RunDir, atomic_write_text, execute
from .sweep import _Data, phase_trainer, build_model

__all__ = [
    "GrowPruneExperimentConfig", "load_grow_prune_config", "run_grow_prune", "format_grow_prune",
    "plot_grow_prune",
]


@dataclass(frozen=True)
class GrowPruneExperimentConfig(HashedConfig):
    """A grow-and-prune search and its baselines (see the module docstring).

    ``start``: the first MLP's hidden widths; ``cycles``: training phases of ``train``
    (``train.epochs`` each); ``grow_prune``: the search's meta-parameters, whose seed is the
    top-level ``seed``; ``model``: the reference network trained for comparison;
    ``baselines``: train the fixed and reference networks."""

    name: str = "grow-prune"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    start: tuple[int, ...] = (16,)
    cycles: int = 10
    train: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=1))
    grow_prune: GrowPruneConfig = field(default_factory=GrowPruneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    baselines: bool = True

    def __post_init__(self) -> None:
        if not self.start:
            raise ConfigError(f"start must list the first MLP's hidden widths (integers >= 1), got {list(self.start)}")
        for w in self.start:
            check_int(w, "start", minimum=1, hint=f"start lists the first MLP's hidden widths, got {list(self.start)}")
        if len(self.start) > self.grow_prune.max_depth:
            raise ConfigError(
                f"start has {len(self.start)} hidden layers but grow_prune.max_depth is {self.grow_prune.max_depth}; "
                "start shallower or raise max_depth"
            )
        check_int(self.cycles, "cycles", minimum=1, hint="training phases; events run between them")
        if self.train.epochs < 1:
            raise ConfigError(f"train.epochs is the training per cycle and must be >= 1, got {self.train.epochs}")
        if self.grow_prune.seed != 0:
            raise ConfigError("grow_prune.seed is taken from the top-level seed; set seed instead and drop grow_prune.seed")


def load_grow_prune_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> GrowPruneExperimentConfig:
    return load_typed(GrowPruneExperimentConfig, path, overrides, "grow-prune config")


def run_grow_prune(
    config: GrowPruneExperimentConfig,
    run: RunDir,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    dataset: ImageDataset | None = None,
) -> dict:
    """Run (or resume, or re-read) the search in ``run``; returns its results."""
    return execute(run, config, lambda data: _Search(config, run, data, progress, echo).run(), echo=echo, dataset=dataset)


class _Search:
    def __init__(self, config: GrowPruneExperimentConfig, run: RunDir, dataset: ImageDataset, progress: bool, echo):
        self.config, self.run_dir, self.progress, self.echo = config, run, progress, echo
        self.data = _Data(config, dataset)
        self.dataset = self.data.dataset
        self.example = self.data.example()
        self.n_in = int(self.example[0].numel())
        self.n_out = self.dataset.num_classes
        self.search = GrowPrune(dataclasses.replace(config.grow_prune, seed=config.seed), example_input=self.example)

    def _mlp(self, widths) -> nn.Module:
        torch.manual_seed(self.config.seed)
        return MLP(self.n_in, widths, self.n_out).to(self.data.device)

    def _trainer(self, model: nn.Module, name: str, phase: PhaseConfig, desc: str) -> Trainer:
        """Seeded by ``derive_seed(seed, "grow_prune", name)``: each cycle and baseline its own stream."""
        return phase_trainer(self.data, self.run_dir, self.config, model, name, phase, None, desc, self.progress,
                             procedure="grow_prune")

    def _fit(self, model: nn.Module, name: str, phase: PhaseConfig, desc: str) -> dict:
        """Train (or resume, or re-read a finished phase); returns its row."""
        trainer = self._trainer(model, name, phase, desc)
        if trainer.resume():
            self.echo(f"resumed {name} at epoch {trainer.state.epoch}/{phase.epochs}")
        history = trainer.fit()
        test = trainer.evaluate(self.data.test)
        val = trainer.evaluate(self.data.val)["acc"] if self.data.val is not None else None
        return {"params": sum(p.numel() for p in model.parameters()), "train_loss": history[-1]["train_loss"],
                "val_acc": val, "test_acc": test["acc"], "test_loss": test["loss"]}

    def _event_path(self, cycle: int) -> Path:
        return self.run_dir.checkpoints / f"event-{cycle}.pt"

    def _restore(self) -> tuple[nn.Module, list[dict]]:
        """The network after the last saved event (or the start) and the finished cycles' rows."""
        rows, last = [], None
        for cycle in range(1, self.config.cycles):
            if not self._event_path(cycle).is_file():
                break
            last = load_checkpoint(self._event_path(cycle))
            rows.append(last["row"])
        if last is None:
            return self._mlp(self.config.start), rows
        model = self._mlp(last["widths"])
        model.load_state_dict(last["model"])
        self.search.load_state_dict(last["search"])
        self.echo(f"restored the search after event {len(rows)} (hidden widths {last['widths']})")
        return model, rows

    def run(self) -> dict:
        config, c = self.config, self.config.grow_prune
        start = mlp_parameters(self.n_in, config.start, self.n_out)
        if start > c.max_params:
            raise ConfigError(
                f"the starting MLP {self.n_in}-{'-'.join(map(str, config.start))}-{self.n_out} has {start} parameters, "
                f"above grow_prune.max_params={c.max_params}; start narrower or raise max_params"
            )
        results = self.run_dir.results()
        results.pop("levels", None)  # the empty default of RunDir.results()
        results.update(
            config_hash=config.short_hash(), name=config.name, dataset=self.dataset.name, seed=config.seed,
            in_features=self.n_in, classes=self.n_out, start=list(config.start), max_params=c.max_params,
            max_depth=c.max_depth, usefulness=c.usefulness, cycles=config.cycles, epochs_per_cycle=config.train.epochs,
            total_epochs=config.cycles * config.train.epochs,
        )
        model, rows = self._restore()
        for cycle in range(len(rows) + 1, config.cycles + 1):
            widths = list(mlp_layout(model).widths)
            row = {"cycle": cycle, "widths": widths, "depth": len(widths),
                   **self._fit(model, f"cycle-{cycle}", config.train, f"cycle {cycle}/{config.cycles} {widths}")}
            row["event"] = None
            if cycle < config.cycles:
                model, row["event"] = self.search.event(model, itertools.islice(self.data.probe(), c.usefulness_batches))
                save_checkpoint(self._event_path(cycle), {"row": row, "widths": row["event"]["widths"],
                                                          "model": model.state_dict(), "search": self.search.state_dict()})
            rows.append(row)
            self._save(results, rows, complete=False)
        last = rows[-1]
        results["final"] = {k: last[k] for k in ("widths", "depth", "params", "val_acc", "test_acc", "test_loss")}
        if config.baselines:
            baselines = results.setdefault("baselines", {})
            total = dataclasses.replace(config.train, epochs=config.cycles * config.train.epochs)
            if "fixed" not in baselines:
                fixed = self._mlp(last["widths"])
                baselines["fixed"] = {"widths": last["widths"], **self._fit(fixed, "fixed", total, "fixed MLP")}
                self._save(results, rows, complete=False)
            if "reference" not in baselines:
                reference = build_model(config, self.dataset).to(self.data.device)
                baselines["reference"] = {"model": config.model.name,
                                          **self._fit(reference, "reference", total, config.model.name)}
        self._save(results, rows, complete=True)
        plot_grow_prune(self.run_dir.results(), self.run_dir.path / "grow_prune.png")
        return self.run_dir.results()

    def _save(self, results: dict, rows: list[dict], complete: bool) -> None:
        out = {**results, "complete": complete, "path": rows}
        self.run_dir.write_results(out)
        atomic_write_text(self.run_dir.path / "grow_prune.md", format_grow_prune(out))


# -- report ---------------------------------------------------------------------------------------
def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _arch(widths) -> str:
    return "-".join(map(str, widths))


def format_grow_prune(results: dict) -> str:
    """Markdown: the path of the search (one row per cycle), then final vs. baselines."""
    lines = [
        f"grow-and-prune on {results.get('dataset', '')}: start {_arch(results.get('start', []))}, "
        f"max_params {results.get('max_params')}, max_depth {results.get('max_depth')}, usefulness "
        f"{results.get('usefulness')}, {results.get('cycles')} cycles of {results.get('epochs_per_cycle')} epoch(s)"
        + ("" if results.get("complete") else " — INCOMPLETE (re-run the same command to resume)"),
        "", "| cycle | hidden widths trained | params | val acc (%) | test acc (%) | event: pruned / deepen / added |",
        "|---|---|---|---|---|---|",
    ]
    for row in results.get("path", []):
        e = row.get("event")
        change = "-" if e is None else (
            f"-{sum(e['pruned'])} / {e['deepen']}"
            + (f" after layer {e['deepened_after'] + 1}" if e["deepened_after"] is not None else "")
            + f" / +{sum(e['added'])} -> {_arch(e['widths'])} ({e['params']})"
        )
        lines.append(f"| {row['cycle']} | {_arch(row['widths'])} | {row['params']} | {_pct(row['val_acc'])} | "
                     f"{_pct(row['test_acc'])} | {change} |")
    final = results.get("final")
    if final:
        lines += ["", "| network | hidden widths | params | test acc (%) | epochs |", "|---|---|---|---|---|",
                  f"| searched (grow-and-prune) | {_arch(final['widths'])} | {final['params']} | "
                  f"{_pct(final['test_acc'])} | {results.get('total_epochs')} |"]
        base = results.get("baselines", {})
        if "fixed" in base:
            b = base["fixed"]
            lines.append(f"| same widths, from scratch | {_arch(b['widths'])} | {b['params']} | {_pct(b['test_acc'])} | "
                         f"{results.get('total_epochs')} |")
        if "reference" in base:
            b = base["reference"]
            lines.append(f"| {b['model']}, from scratch | - | {b['params']} | {_pct(b['test_acc'])} | "
                         f"{results.get('total_epochs')} |")
    lines += ["", "Each cycle trains the widths shown, then (except the last) one event prunes the least useful "
              "units, maybe inserts an identity layer, and adds random units; params count weights and biases."]
    return "\n".join(lines) + "\n"


def plot_grow_prune(results: dict, path: str | Path) -> Path:
    """Two panels along the cycles: parameters (with the budget) and accuracy (with the
    baselines); a dotted vertical line marks each inserted layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("path", [])
    cycles = [r["cycle"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 6), dpi=120, sharex=True)
    top.plot(cycles, [r["params"] for r in rows], "o-", label="searched MLP")
    for r in rows:
        top.annotate(_arch(r["widths"]), (r["cycle"], r["params"]), fontsize=6, rotation=-30,
                     textcoords="offset points", xytext=(3, -4), va="top")
    top.axhline(results.get("max_params", 0), color="grey", ls="--", label="max_params")
    top.set_ylim(0, 1.1 * max([results.get("max_params", 0)] + [r["params"] for r in rows]))
    top.set_ylabel("parameters")
    for key, style in (("val_acc", "s-"), ("test_acc", "o-")):
        points = [(r["cycle"], 100 * r[key]) for r in rows if r.get(key) is not None]
        if points:
            bottom.plot(*zip(*points), style, label=key.replace("_acc", " accuracy"))
    for (key, label), color in zip((("fixed", "final widths from scratch"), ("reference", "reference")), ("C2", "C3")):
        b = results.get("baselines", {}).get(key)
        if b:
            bottom.axhline(100 * b["test_acc"], color=color, ls="--",
                           label=f"{b.get('model', label)} ({b['params']} params), test")
    for r in rows:
        if r.get("event") and r["event"]["deepened_after"] is not None:
            for ax in (top, bottom):
                ax.axvline(r["cycle"] + 0.5, color="k", ls=":", alpha=0.5)
    bottom.set_xlabel("cycle (a dotted line: a layer was inserted after that cycle)")
    bottom.set_ylabel("accuracy (%)")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    top.set_title(f"grow-and-prune on {results.get('dataset', '')}, seed {results.get('seed')}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
