"""Growing an MLP during training: GradMax vs random vs zero growth (``secateurs grow``).

After Evci et al. (2022), Sec. 5.1: an MLP starts at ``start`` hidden widths and is widened
to ``target`` widths during training by a :class:`~secateurs.grow.Grower` (``events`` growth
events, ``every`` steps apart, from step ``start_step``); the arms differ only in how new
units are initialised. Two fixed-width baselines bracket them: ``small`` (the start widths
throughout) and ``big`` (the target widths from the start). Every (arm, seed) is one
phase with a per-epoch checkpoint -- a grown network's checkpoint is reloaded by first
regrowing the model to the saved widths -- and a finished phase is a row in
``results.json``, never redone.

The training-loss curve is measured every ``eval_every`` steps on a fixed, unaugmented
subset of the training set (``loss_subset`` images), so curves of all arms are comparable
point by point; the growth events record the gradient norm of the new units' weights on
the growth batches right after they were added.
"""
from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..data import ImageDataset, InMemoryLoader
from ..errors import ConfigError
from ..grow import GROWTH_INITS, Grower, widths
from ..models import MLP, count_parameters
from ..train import Trainer, load_checkpoint, save_checkpoint
from .config import DataConfig, HashedConfig, PhaseConfig, load_typed
from .runs import RunDir, atomic_write_text, execute
from ..analysis.report import mean_std

__all__ = ["GrowthSettings", "GrowthConfig", "load_growth_config", "run_growth", "format_growth", "ARMS"]

BASELINES = ("small", "big")
ARMS = (*GROWTH_INITS, *BASELINES)


@dataclass(frozen=True)
class GrowthSettings:
    """Which widths, when to grow, and how new units are drawn."""

    start: tuple[int, ...] = (75, 25)
    target: tuple[int, ...] = (300, 100)
    arms: tuple[str, ...] = ("gradmax", "random", "zero", "small", "big")  # never change a default: runs hash only non-defaults
    start_step: int = 200
    every: int = 200
    events: int = 10
    grad_batches: int = 4
    scale: float = 0.5
    bias: float = 1e-3
    loss_subset: int = 10000

    def __post_init__(self) -> None:
        if not self.start or len(self.start) != len(self.target):
            raise ConfigError(f"growth.start {list(self.start)} and growth.target {list(self.target)} need one width per hidden layer")
        if any(not isinstance(s, int) or not isinstance(t, int) or not 1 <= s <= t for s, t in zip(self.start, self.target)):
            raise ConfigError(f"growth widths must be integers with 1 <= start <= target; got {list(self.start)} -> {list(self.target)}")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms or len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"growth.arms {list(self.arms)}: each once, from {', '.join(ARMS)}")
        for name in ("every", "events", "grad_batches", "loss_subset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"growth.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 1:
            raise ConfigError(f"growth.start_step must be an integer >= 1 (after the first step), got {self.start_step!r}")


@dataclass(frozen=True)
class GrowthConfig(HashedConfig):
    """A whole growth comparison: every arm for every seed."""

    name: str = "growth"
    seeds: tuple[int, ...] = (0,)
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    train: PhaseConfig = field(default_factory=PhaseConfig)
    growth: GrowthSettings = field(default_factory=GrowthSettings)

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds {list(self.seeds)} must be a non-empty list without repeats")


def load_growth_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> GrowthConfig:
    return load_typed(GrowthConfig, path, overrides, "growth config")


def run_growth(
    config: GrowthConfig, run: RunDir, *, progress: bool = True, echo: Callable[[str], None] = print,
    dataset: ImageDataset | None = None,
) -> dict:
    """Run (or resume, or re-read) the comparison in ``run``; returns its results."""
    return execute(run, config, lambda data: _Growth(config, run, data, progress, echo).run(), echo=echo, dataset=dataset)


class _Growth:
    def __init__(self, config: GrowthConfig, run: RunDir, dataset: ImageDataset, progress: bool, echo):
        from .sweep import _Data

        self.config, self.run_dir, self.progress, self.echo = config, run, progress, echo
        self.g = config.growth
        self.data = _Data(config, dataset)
        self.dataset = self.data.dataset
        self.example = self.data.example()
        n = min(self.g.loss_subset, len(self.dataset.train_labels))
        self.loss_data = InMemoryLoader(
            self.dataset.train_images[:n], self.dataset.train_labels[:n], config.data.eval_batch_size,
            shuffle=False, transform=self.data.transform, device=self.data.device,
        )
        self.layers = [f"net.{1 + 2 * i}" for i in range(len(self.g.start))]  # MLP's hidden Linear layers

    def _model(self, hidden: Sequence[int], seed: int) -> nn.Module:
        torch.manual_seed(seed)
        d = self.dataset
        return MLP(d.in_channels * d.image_size[0] * d.image_size[1], hidden, d.num_classes).to(self.data.device)

    def phase(self, arm: str, seed: int) -> dict:
        g = self.g
        name = f"{arm}-seed{seed}"
        model = self._model(g.target if arm == "big" else g.start, seed)
        cfg = self.config.train.train_config(seed=seed, device=self.config.device)
        probe = self.data.probe()
        trainer = Trainer(
            model, self.data.train(seed), cfg, eval_data=self.data.test, val_data=self.loss_data,
            checkpoint_path=self.run_dir.checkpoint(name), progress=self.progress, progress_desc=name,
            callbacks=[lambda record: self.run_dir.log({"phase": name, **record})],
        )
        grower = None
        if arm in GROWTH_INITS:
            grower = Grower(
                model, trainer.optimizer, dict(zip(self.layers, g.target)), example_input=next(iter(probe))[0][:8], init=arm, start=g.start_step, every=g.every, events=g.events,
                batches=lambda: itertools.islice(probe, (grower.step_count // g.every) % len(probe), None),
                grad_batches=g.grad_batches, scale=g.scale, bias=g.bias, seed=seed, measure=True,
            )
            trainer.sparsifier = grower
        path = self.run_dir.checkpoint(name)
        if path.is_file():
            if grower is not None:
                grower.restore_widths(load_checkpoint(path)["sparsifier"])
            trainer.resume()
            self.echo(f"resumed {name} at epoch {trainer.state.epoch}/{cfg.epochs}")
        trainer.fit()
        save_checkpoint(path, trainer.state_dict())
        final = trainer.evaluate(self.data.test)
        train_loss = trainer.evaluate(self.loss_data)
        if grower is not None and not grower.finished:
            raise ConfigError(
                f"{name} ended before growing to {g.target}: the last growth step "
                f"{g.start_step + (g.events - 1) * g.every} is beyond the {trainer.state.step} training steps"
            )
        return {
            "arm": arm, "seed": seed, "test_acc": final["acc"], "test_loss": final["loss"],
            "train_loss": train_loss["loss"], "widths": list(widths(model, self.layers).values()),
            "parameters": count_parameters(model),
            "curve": [{"step": e["step"], "train_loss": e["val_loss"], "test_acc": e["test_acc"]} for e in trainer.evaluations],
            "growth": grower.history if grower is not None else [],
        }

    def run(self) -> dict:
        results = self.run_dir.results()
        rows = {(r["arm"], r["seed"]): r for r in results.get("rows", [])}
        results.update(config_hash=self.config.short_hash(), name=self.config.name, dataset=self.dataset.name,
                       start=list(self.g.start), target=list(self.g.target),
                       growth_steps=[self.g.start_step + i * self.g.every for i in range(self.g.events)])
        for seed in self.config.seeds:
            for arm in self.g.arms:
                if (arm, seed) not in rows:
                    rows[(arm, seed)] = self.phase(arm, seed)
                    self._save(results, rows, complete=False)
        self._save(results, rows, complete=True)
        _plot_curves(self.run_dir.results(), self.run_dir.path / "growth_loss.png")
        return self.run_dir.results()

    def _save(self, results: dict, rows: dict, complete: bool) -> None:
        order = {a: i for i, a in enumerate(self.g.arms)}
        ordered = sorted(rows.values(), key=lambda r: (order.get(r["arm"], 99), r["seed"]))
        out = {**results, "complete": complete, "rows": ordered, "summary": summarize(ordered)}
        self.run_dir.write_results(out)
        atomic_write_text(self.run_dir.path / "growth.md", format_growth(out))


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Mean and std over seeds per arm: final accuracy and loss, and the new units' gradient
    norm at the first growth event (what GradMax maximises)."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    out = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        first = [r["growth"][0]["grad_norm"] for r in mine if r["growth"] and "grad_norm" in r["growth"][0]]
        out.append({
            "arm": arm, "seeds": len(mine), "parameters": mine[0]["parameters"], "widths": mine[0]["widths"],
            "test_acc": mean_std([r["test_acc"] for r in mine]), "train_loss": mean_std([r["train_loss"] for r in mine]),
            "first_growth_grad_norm": mean_std(first),
        })
    return out


def _pm(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    if s["mean"] is None:
        return "-"
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def format_growth(results: dict) -> str:
    lines = [
        f"MLP {results.get('start')} -> {results.get('target')} on {results.get('dataset', '')}"
        + ("" if results.get("complete") else " — INCOMPLETE (re-run the same command to resume)"),
        "", "| arm | seeds | final widths | params | test acc. (%) | final train loss | new-weight grad norm at 1st growth |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in results.get("summary", []):
        lines.append(
            f"| {s['arm']} | {s['seeds']} | {s['widths']} | {s['parameters']} | {_pm(s['test_acc'], 100)} | "
            f"{_pm(s['train_loss'], 1, 4)} | {_pm(s['first_growth_grad_norm'], 1, 4)} |"
        )
    lines += ["", "mean ± std over seeds; train loss on a fixed unaugmented training subset; the gradient norm is "
              "that of the new units' incoming and outgoing weights together, on the growth batches right after growing."]
    return "\n".join(lines) + "\n"


def _plot_curves(results: dict, path: Path) -> None:
    """Training loss vs step, mean over seeds per arm (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in dict.fromkeys(r["arm"] for r in results.get("rows", [])):
        curves = [r["curve"] for r in results["rows"] if r["arm"] == arm and r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [c["step"] for c in curves[0][:n]]
        mean = [statistics.fmean(c[i]["train_loss"] for c in curves) for i in range(n)]
        ax.plot(steps, mean, label=f"{arm} ({len(curves)} seeds)")
    steps = results.get("growth_steps") or []
    if steps:
        ax.axvspan(steps[0], steps[-1], color="0.92", zorder=0, label="growth events")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (fixed subset)")
    ax.set_title(f"growing {results.get('start')} -> {results.get('target')}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
