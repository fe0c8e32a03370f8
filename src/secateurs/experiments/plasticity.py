"""Pruning plasticity (Liu et al. 2021, GraNet §3): how well a network recovers from pruning,
depending on *when* it is pruned and *how much*, with and without neuroregeneration.

For every epoch ``t`` in ``prune_epochs`` and ratio ``p`` in ``ratios``: take the dense
network at the end of epoch ``t``, measure its test accuracy (``acc_pre``), prune ``p`` of its
weights by global magnitude, continue training for ``continue_epochs`` at the learning rate
it had at ``t`` (``acc_continue``). Plasticity is ``acc_continue - acc_pre``. With
``regeneration`` the continued training also swaps connections by gradient (GraNet's
zero-cost neuroregeneration, constant sparsity); without, the mask is frozen.

The study is a procedure of units (:mod:`.runner`): the dense run, which keeps a checkpoint at
the end of every epoch, then one unit per cell, each in its own run directory named by the hash
of everything that decides its result (:class:`PlasticityCell`). So an interrupted study
resumes where it stopped, a changed setting never reuses another study's cells, and the cells
can run in parallel (``--executor processes:N`` or ``ray``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable


from ..errors import ConfigError
from ..seeding import derive_seed
from ..typed_config import from_dict
from .config import ExperimentConfig, HashedConfig, aggregate_dir, load_typed, with_model_defaults
from .runs import RunDir, atomic_write_text, execute


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


@dataclass(frozen=True)
class PlasticityCell(HashedConfig):
    """One cell of the grid, a unit with its own run directory: the dense run it starts from,
    when (``epoch``) and how much (``ratio``) it prunes, and how it continues. Every setting
    that changes the cell's result is here, so a changed study never reuses another's cell."""

    name: str = "plasticity-cell"
    dense: ExperimentConfig = field(default_factory=ExperimentConfig)
    epoch: int = 1
    ratio: float = 0.5
    regeneration: bool = False
    continue_epochs: int = 1
    schedule: RegenerationConfig = field(default_factory=RegenerationConfig)


def cells(study: PlasticityConfig) -> list[PlasticityCell]:
    config = study.experiment()
    # a cell without regeneration does not read its schedule: the default keeps its hash (and
    # its result) shared by studies that differ only in the regeneration settings
    schedule_of = lambda regen: study.regeneration if regen else RegenerationConfig()  # noqa: E731
    return [PlasticityCell(name=f"{study.name}-t{t}-p{ratio:g}{'-regen' if regen else ''}", dense=config, epoch=t,
                           ratio=ratio, regeneration=regen, continue_epochs=study.continue_epochs,
                           schedule=schedule_of(regen))
            for t in sorted(set(study.prune_epochs)) for ratio in study.ratios for regen in (False, True)]


def run_plasticity(
    study: PlasticityConfig,
    runs_dir: str | Path,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    executor="local",
    threads: int | None = None,
) -> dict:
    """Run (or resume) the study on ``executor``: the dense run first (one unit, keeping a
    checkpoint at every epoch), then every cell (a unit each); returns ``{"cells": [...],
    "dir": ..., "missing": [...], "failed": [...]}``."""
    from ..models import MODELS
    from .runner import Unit, failures, run_units

    config = study.experiment()
    MODELS.get(config.model.name)
    grid = cells(study)
    _check_regeneration(study, config)
    dense = run_units([Unit("dense", config, run_dense)], runs_dir, executor, progress=progress, echo=echo,
                      threads=threads)
    if not dense[0].ok:
        raise ConfigError(f"the dense run of {study.name} did not finish: {dense[0].error}")
    outcomes = run_units([Unit(c.name, c, run_cell) for c in grid], runs_dir, executor, progress=progress, echo=echo,
                         threads=threads)
    out_dir = aggregate_dir(runs_dir, study, "plasticity")
    done, missing = [], []
    for cell in grid:
        results = RunDir.for_config(cell, runs_dir).results()
        (done.append(results["cell"]) if results.get("complete") else missing.append(cell.name))
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir, study, done)
    return {"cells": sorted(done, key=_key), "dir": str(out_dir), "missing": missing, "failed": failures(outcomes)}


def _key(c: dict) -> tuple:
    return c["epoch"], c["ratio"], c["regeneration"]


def _check_regeneration(study: PlasticityConfig, config: ExperimentConfig) -> None:
    """Regeneration must swap at least once during the continued training (checked before
    the dense run, which needs only the training set's size)."""
    from .runner import cached_dataset
    from .sweep import _Data

    total = len(_Data(config, cached_dataset(config.data.dataset, config.data.root)).train(0)) * study.continue_epochs
    if study.regeneration.every >= total:
        raise ConfigError(
            f"regeneration.every={study.regeneration.every} is not shorter than the continued training ({total} steps); "
            "lower it or raise continue_epochs"
        )


def run_dense(config: ExperimentConfig, run: RunDir, *, progress: bool, echo, wait: bool = False, dataset=None) -> dict:
    """The dense network, trained for ``train.epochs`` with a checkpoint kept at the end of every
    epoch (``checkpoints/epoch-T.pt``), which the cells start from."""
    from ..train import Trainer, save_checkpoint
    from .sweep import _Data, _train_config, build_model

    def body(dataset) -> dict:
        data = _Data(config, dataset)
        model = build_model(config, dataset)
        snapshot = lambda record: save_checkpoint(run.checkpoint(f"epoch-{record['epoch']}"), trainer.state_dict())  # noqa: E731
        seed = derive_seed(config.seed, "plasticity", "dense")
        trainer = Trainer(model, data.train(seed), _train_config(config.train, config, seed), eval_data=data.test,
                          checkpoint_path=run.checkpoint("dense"), progress=progress, progress_desc="dense",
                          callbacks=[snapshot])
        if trainer.resume():
            echo(f"resumed dense training at epoch {trainer.state.epoch}")
            if trainer.state.epoch and not run.checkpoint(f"epoch-{trainer.state.epoch}").is_file():
                save_checkpoint(run.checkpoint(f"epoch-{trainer.state.epoch}"), trainer.state_dict())  # killed in between
        history = trainer.fit()
        results = {"complete": True, "test_acc": history[-1]["test_acc"], "epochs": len(history)}
        run.write_results(results)
        return results

    return execute(run, config, body, echo=echo, dataset=dataset, wait=wait)


def run_cell(cell: PlasticityCell, run: RunDir, *, progress: bool, echo, wait: bool = False, dataset=None) -> dict:
    """Prune the dense network of epoch ``cell.epoch`` by ``cell.ratio`` and continue at its
    learning rate; resumable per epoch like any phase."""
    from ..train import load_checkpoint

    config = cell.dense
    snapshot = RunDir.for_config(config, run.path.parent).checkpoint(f"epoch-{cell.epoch}")

    def body(dataset) -> dict:
        from .sweep import _Data

        if not snapshot.is_file():
            raise ConfigError(
                f"the dense run has no checkpoint of epoch {cell.epoch} ({snapshot}); it was trained before every "
                f"epoch was kept. Delete {snapshot.parent.parent} and re-run to train it again"
            )
        result = _cell(cell, config, _Data(config, dataset), dataset, load_checkpoint(snapshot), run, progress, echo)
        results = {"complete": True, "cell": result}
        run.write_results(results)
        return results

    if dataset is None:
        from .runner import cached_dataset

        dataset = cached_dataset(config.data.dataset, config.data.root)
    return execute(run, cell, body, echo=echo, dataset=dataset, wait=wait)


def _cell(cell: PlasticityCell, config, data, dataset, state, run: RunDir, progress, echo) -> dict:
    """Prune the epoch-``epoch`` network by ``ratio`` and continue at its learning rate."""
    from ..methods import Sparsifier
    from ..regrowth import GradientRegrowth
    from ..schedules import CosineDropFraction
    from ..scores import magnitude
    from ..train import Trainer, build_optimizer
    from .sweep import _read_json, _train_config, build_model

    epoch, ratio, regen = cell.epoch, cell.ratio, cell.regeneration
    model = build_model(config, dataset)
    model.load_state_dict(state["model"])
    lr = float(state["optimizer"]["param_groups"][0]["lr"])
    optimizer_cfg = replace(config.train.optimizer, lr=lr)
    phase = replace(config.train, epochs=cell.continue_epochs, optimizer=optimizer_cfg,
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
    total = len(train_data) * cell.continue_epochs
    regeneration = None
    if regen:
        r = cell.schedule
        regeneration = CosineDropFraction(initial=r.drop_fraction, every=r.every, end=total, minimum=r.drop_fraction_min)
    sparsifier = Sparsifier(
        model, optimizer, score=magnitude, sparsity=ratio, scope="global",
        regrowth=GradientRegrowth() if regen else None, swap_schedule=regeneration, seed=config.seed,
    )
    # unless the config says otherwise, a network that never recovers from a prune is what plasticity measures
    cfg = _train_config(phase, config, seed, health="mark")
    trainer = Trainer(model, train_data, cfg, optimizer=optimizer, sparsifier=sparsifier, eval_data=data.test,
                      checkpoint_path=run.checkpoint("continue"), progress=progress,
                      progress_desc=f"t={epoch} p={ratio:g}{' +regen' if regen else ''}")
    pending = run.path / ".pruned.json"
    if trainer.resume():
        echo(f"resumed {cell.name} at epoch {trainer.state.epoch}/{cell.continue_epochs}")
        before = _read_json(pending)
        acc_pre, acc_pruned = before["acc_pre"], before["acc_pruned"]
    else:
        acc_pre = trainer.evaluate(data.test)["acc"]
        sparsifier.prune(ratio)
        acc_pruned = trainer.evaluate(data.test)["acc"]
        atomic_write_text(pending, json.dumps({"acc_pre": acc_pre, "acc_pruned": acc_pruned}))
    trainer.fit()
    acc_continue = trainer.evaluate(data.test)["acc"]
    return {
        "epoch": epoch, "ratio": ratio, "regeneration": regen, "lr": lr,
        "acc_pre": acc_pre, "acc_pruned": acc_pruned, "acc_continue": acc_continue,
        "plasticity": acc_continue - acc_pre, "sparsity": sparsifier.sparsity, "health": trainer.health,
    }


def _write(out_dir: Path, study: PlasticityConfig, cells: list[dict]) -> None:
    cells = sorted(cells, key=_key)
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
