"""Pruning plasticity (Liu et al. 2021, GraNet §3): how well a network recovers from pruning,
depending on *when* it is pruned and *how much*, with and without neuroregeneration.

For every epoch ``t`` in ``prune_epochs`` and ratio ``p`` in ``ratios``: take the dense
network at the end of epoch ``t``, measure its test accuracy (``acc_pre``), prune ``p`` of its
weights by global magnitude, continue training for ``continue_epochs`` at the learning rate
it had at ``t`` (``acc_continue``). Plasticity is ``acc_continue - acc_pre``. With
``regeneration`` the continued training also swaps connections by gradient (GraNet's
zero-cost neuroregeneration, constant sparsity); without, the mask is frozen.

Every cell is recorded in ``plasticity.json`` as soon as it finishes, and the dense run keeps
a checkpoint per requested epoch, so an interrupted study resumes where it stopped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable


from ..errors import ConfigError
from ..seeding import derive_seed
from ..typed_config import from_dict
from .config import ExperimentConfig, aggregate_dir, load_typed, with_model_defaults
from .runs import RunDir, atomic_write_text


@dataclass(frozen=True)
class RegenerationConfig:
    """GraNet's regeneration during the continued training: every ``every`` steps swap a
    ``drop_fraction`` (cosine-decayed to ``drop_fraction_min``) of each layer's weights."""

    every: int = 100
    drop_fraction: float = 0.5
    drop_fraction_min: float = 0.005


@dataclass(frozen=True)
class PlasticityConfig:
    name: str
    prune_epochs: tuple[int, ...]
    ratios: tuple[float, ...]
    continue_epochs: int = 1
    regeneration: RegenerationConfig = field(default_factory=RegenerationConfig)
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ..allocation import check_sparsity

        if not self.prune_epochs or any(e < 1 for e in self.prune_epochs):
            raise ConfigError(f"prune_epochs must be epochs >= 1 of the dense run, got {list(self.prune_epochs)}")
        if not self.ratios:
            raise ConfigError("ratios must list at least one pruning ratio, e.g. [0.5, 0.9]")
        for r in self.ratios:
            check_sparsity(r, "ratios entry")
        if self.continue_epochs < 1:
            raise ConfigError(f"continue_epochs must be >= 1, got {self.continue_epochs}")

    def experiment(self) -> ExperimentConfig:
        config = from_dict(ExperimentConfig, with_model_defaults({**self.base, "name": f"{self.name}-dense"}))
        if max(self.prune_epochs) > config.train.epochs:
            raise ConfigError(
                f"prune_epochs {list(self.prune_epochs)} go beyond the dense run's {config.train.epochs} "
                "epochs (base.train.epochs); lower them or train longer"
            )
        return config


def load_plasticity(path: str | Path, overrides: dict[str, Any] | None = None) -> PlasticityConfig:
    """A plasticity YAML with dotted overrides (``continue_epochs``, ``base.train.epochs``) applied."""
    return load_typed(PlasticityConfig, path, overrides, "plasticity config")


def run_plasticity(
    study: PlasticityConfig,
    runs_dir: str | Path,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    dataset=None,
) -> dict:
    """Run (or resume) the study; returns ``{"cells": [...], "dir": ...}``."""
    from ..data import load_dataset
    from ..models import MODELS
    from ..train import Trainer, load_checkpoint, save_checkpoint
    from .sweep import _Data, _train_config, build_model

    config = study.experiment()
    MODELS.get(config.model.name)
    dataset = dataset if dataset is not None else load_dataset(config.data.dataset, config.data.root)
    run = RunDir.for_config(config, runs_dir)
    run.bind(config)
    out_dir = aggregate_dir(runs_dir, study, "plasticity")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _Data(config, dataset)

    with run.lock():
        # -- the dense run, keeping a checkpoint at every requested epoch -------------------
        wanted = sorted(set(study.prune_epochs))
        snapshots = {t: run.checkpoint(f"epoch-{t}") for t in wanted}
        if not all(p.is_file() for p in snapshots.values()):
            model = build_model(config, dataset)
            dense_seed = derive_seed(config.seed, "plasticity", "dense")

            def snapshot(record: dict) -> None:
                if record["epoch"] in snapshots:
                    save_checkpoint(snapshots[record["epoch"]], trainer.state_dict())

            trainer = Trainer(
                model, data.train(dense_seed), _train_config(config.train, config, dense_seed),
                eval_data=data.test, checkpoint_path=run.checkpoint("dense"), progress=progress,
                progress_desc="dense", callbacks=[snapshot],
            )
            if trainer.resume():
                echo(f"resumed dense training at epoch {trainer.state.epoch}")
                if trainer.state.epoch in snapshots and not snapshots[trainer.state.epoch].is_file():
                    save_checkpoint(snapshots[trainer.state.epoch], trainer.state_dict())  # killed in between
            # the learning-rate schedule is the full dense run's; training stops at the last snapshot
            trainer.cfg = replace(trainer.cfg, epochs=max(wanted))
            trainer.fit()

        # -- the grid ------------------------------------------------------------------------
        results_path = out_dir / "plasticity.json"
        done = json.loads(results_path.read_text())["cells"] if results_path.is_file() else []
        key = lambda c: (c["epoch"], c["ratio"], c["regeneration"])  # noqa: E731
        finished = {key(c) for c in done}
        cells = list(done)
        grid = [(t, p, regen) for t in wanted for p in study.ratios for regen in (False, True)]
        for i, (t, ratio, regen) in enumerate(grid, start=1):
            if (t, ratio, regen) in finished:
                continue
            echo(f"[{i}/{len(grid)}] epoch {t}, prune {ratio:g}, regeneration {'on' if regen else 'off'}")
            state = load_checkpoint(snapshots[t])
            cells.append(_cell(study, config, data, dataset, state, t, ratio, regen, progress))
            _write(out_dir, study, cells)
        _write(out_dir, study, cells)
    return {"cells": cells, "dir": str(out_dir)}


def _cell(study, config, data, dataset, state, epoch, ratio, regen, progress) -> dict:
    """Prune the epoch-``epoch`` network by ``ratio`` and continue at its learning rate."""
    from ..methods import Sparsifier
    from ..regrowth import GradientRegrowth
    from ..schedules import CosineDropFraction
    from ..scores import magnitude
    from ..train import Trainer, build_optimizer
    from .sweep import _train_config, build_model

    model = build_model(config, dataset)
    model.load_state_dict(state["model"])
    lr = float(state["optimizer"]["param_groups"][0]["lr"])
    optimizer_cfg = replace(config.train.optimizer, lr=lr)
    phase = replace(config.train, epochs=study.continue_epochs, optimizer=optimizer_cfg,
                    lr_schedule=replace(config.train.lr_schedule, name="constant", milestones=(), warmup_epochs=0.0))
    model.to(data.device)
    optimizer = build_optimizer(model, optimizer_cfg)
    optimizer.load_state_dict(state["optimizer"])  # momentum carries on, as in continued training
    for group in optimizer.param_groups:
        group["lr"] = lr
        group.pop("initial_lr", None)  # else the new (constant) schedule restarts from the base LR
    # every cell continued from epoch t sees the same batches (the cells differ only by ratio / regeneration)
    seed = derive_seed(config.seed, "plasticity", "epoch", epoch)
    train_data = data.train(seed)
    total = len(train_data) * study.continue_epochs
    regeneration = None
    if regen:
        r = study.regeneration
        if r.every >= total:
            raise ConfigError(
                f"regeneration.every={r.every} is not shorter than the continued training ({total} steps); "
                "lower it or raise continue_epochs"
            )
        regeneration = CosineDropFraction(initial=r.drop_fraction, every=r.every, end=total, minimum=r.drop_fraction_min)
    sparsifier = Sparsifier(
        model, optimizer, score=magnitude, sparsity=ratio, scope="global",
        regrowth=GradientRegrowth() if regen else None, swap_schedule=regeneration, seed=config.seed,
    )
    # unless the config says otherwise, a network that never recovers from a prune is what plasticity measures
    cfg = _train_config(phase, config, seed, health="mark")
    trainer = Trainer(model, train_data, cfg, optimizer=optimizer,
                      sparsifier=sparsifier, eval_data=data.test, progress=progress,
                      progress_desc=f"t={epoch} p={ratio:g}{' +regen' if regen else ''}")
    acc_pre = trainer.evaluate(data.test)["acc"]
    sparsifier.prune(ratio)
    acc_pruned = trainer.evaluate(data.test)["acc"]
    trainer.fit()
    acc_continue = trainer.evaluate(data.test)["acc"]
    return {
        "epoch": epoch, "ratio": ratio, "regeneration": regen, "lr": lr,
        "acc_pre": acc_pre, "acc_pruned": acc_pruned, "acc_continue": acc_continue,
        "plasticity": acc_continue - acc_pre, "sparsity": sparsifier.sparsity, "health": trainer.health,
    }


def _write(out_dir: Path, study: PlasticityConfig, cells: list[dict]) -> None:
    cells = sorted(cells, key=lambda c: (c["epoch"], c["ratio"], c["regeneration"]))
    atomic_write_text(out_dir / "plasticity.json", json.dumps({"name": study.name, "cells": cells}, indent=2))
    import csv
    import io

    from ..analysis.report import health_cell

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    columns = ["epoch", "ratio", "regeneration", "lr", "acc_pre", "acc_pruned", "acc_continue", "plasticity"]
    writer.writerow([*columns, "health"])
    writer.writerows([*(c[k] for k in columns), health_cell(c)] for c in cells)
    atomic_write_text(out_dir / "plasticity.csv", table.getvalue())
    if cells:
        from ..analysis.plots import plot_plasticity

        plot_plasticity(cells, out_dir / "plasticity.png", study.name)


def format_plasticity(cells: list[dict]) -> str:
    """Markdown grid: rows = pruning epoch, columns = ratio, cells = change in accuracy (pt),
    without / with regeneration; "!" marks a cell whose continued training learned nothing
    (its health verdict), listed under the grid."""
    ratios = sorted({c["ratio"] for c in cells})
    epochs = sorted({c["epoch"] for c in cells})
    by = {(c["epoch"], c["ratio"], c["regeneration"]): c for c in cells}
    head = "| epoch (lr) | " + " | ".join(f"{100 * r:g}%" for r in ratios) + " |"
    lines = [head, "|" + "---|" * (len(ratios) + 1)]
    for t in epochs:
        lr = next(c["lr"] for c in cells if c["epoch"] == t)
        row = []
        for r in ratios:
            a, b = by.get((t, r, False)), by.get((t, r, True))
            fmt = lambda c: "?" if c is None else f"{100 * c['plasticity']:+.2f}" + ("!" if c.get("health") else "")  # noqa: E731
            row.append(f"{fmt(a)} / {fmt(b)}")
        lines.append(f"| {t} ({lr:g}) | " + " | ".join(row) + " |")
    failed = [c for c in sorted(cells, key=lambda c: (c["epoch"], c["ratio"], c["regeneration"])) if c.get("health")]
    if failed:
        lines.append("")
        lines += [f"! epoch {c['epoch']}, prune {100 * c['ratio']:g}%, regeneration {'on' if c['regeneration'] else 'off'}: "
                  f"{c['health']}" for c in failed]
    return "\n".join(lines) + "\n"
