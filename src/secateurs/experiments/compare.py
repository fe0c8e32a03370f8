"""Method comparisons: several methods x several seeds, one table with mean +- std.

A comparison config is a ``base`` experiment config plus a list of ``variants`` (a label, a
method and its params) and ``seeds``. Every (variant, seed) is an ordinary sweep run in its
own run directory (named by the hash of its config), so a comparison resumes after an
interruption, reuses every finished run, and can be split across processes (``--seeds``)
and aggregated afterwards by running it again.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from ..analysis.report import mean_std
from ..errors import ConfigError
from ..typed_config import from_dict
from .config import ExperimentConfig, aggregate_dir, apply_overrides, load_typed, with_model_defaults
from .runs import RunDir, atomic_write_text


@dataclass(frozen=True)
class Variant:
    """One line of the comparison: ``method`` with ``params`` (and optionally a ``scope``);
    ``set`` overrides other config keys for this line only, dotted (``finetune.epochs``)."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    scope: str | None = None
    set: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComparisonConfig:
    name: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    dense: bool = True
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.variants:
            raise ConfigError("a comparison needs at least one entry under variants")
        labels = [v.label for v in self.variants]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"variant labels must be unique, got {labels}")
        if not self.seeds:
            raise ConfigError("a comparison needs at least one seed")


def load_comparison(path: str | Path, overrides: dict[str, Any] | None = None) -> ComparisonConfig:
    """A comparison YAML with dotted overrides (``base.train.epochs``, ``seeds``) applied."""
    return load_typed(ComparisonConfig, path, overrides, "comparison config")


def _override(base: dict, overrides: dict) -> ExperimentConfig:
    """The base experiment with dotted overrides, validated like any config."""
    return from_dict(ExperimentConfig, with_model_defaults(apply_overrides(base, overrides)))


def experiment_configs(comparison: ComparisonConfig, seeds: tuple[int, ...] | None = None) -> list[tuple[str, int, ExperimentConfig]]:
    """``(label, seed, config)`` for every run of the comparison (dense first)."""
    out = []
    for seed in seeds if seeds is not None else comparison.seeds:
        name = comparison.name
        if comparison.dense:
            out.append(("dense", seed, _override(comparison.base, {
                "name": f"{name}-dense", "seed": seed, "prune.sparsities": [], "prune.method": "magnitude",
            })))
        for v in comparison.variants:
            overrides = {
                "name": f"{name}-{v.label}", "seed": seed, "prune.method": v.method,
                "prune.params": dict(v.params), "prune.dense_baseline": False,
            }
            if v.scope is not None:
                overrides["prune.scope"] = v.scope
            overrides.update(v.set)
            out.append((v.label, seed, _override(comparison.base, overrides)))
    return out


def comparison_units(comparison: ComparisonConfig, seeds: tuple[int, ...] | None = None) -> list:
    """One unit per (line, seed): an ordinary sweep run in its own run directory."""
    from .runner import Unit
    from .sweep import run_sweep

    return [Unit(f"{label} seed {seed}", config, run_sweep, {"dense_only": label == "dense"})
            for label, seed, config in experiment_configs(comparison, seeds)]


def run_comparison(
    comparison: ComparisonConfig,
    runs_dir: str | Path,
    *,
    seeds: tuple[int, ...] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    executor="local",
    threads: int | None = None,
) -> dict:
    """Run (or reuse) every run on ``executor`` (see :mod:`.runner`), then aggregate into
    ``<runs_dir>/<name>-<hash>-comparison/``. A run that diverges or fails is listed (with its
    unit key and message) and the others go on."""
    from ..methods import METHODS
    from ..models import MODELS
    from .runner import failures, run_units
    from .sweep import check_sweep

    unknown = sorted(set(seeds or ()) - set(comparison.seeds))
    if unknown:
        raise ConfigError(f"seeds {unknown} are not in the comparison's seeds {list(comparison.seeds)}")
    units = comparison_units(comparison, seeds)
    for unit in units:  # fail on a bad name before any training
        METHODS.get(unit.config.prune.method)
        MODELS.get(unit.config.model.name)
        check_sweep(unit.config, dense_only=unit.kwargs["dense_only"])
    outcomes = run_units(units, runs_dir, executor, progress=progress, echo=echo, threads=threads)
    summary = aggregate(comparison, runs_dir)
    summary["diverged"] = [o.key for o in outcomes if o.status == "diverged"]
    summary["failed"] = failures(outcomes)
    return summary


def aggregate(comparison: ComparisonConfig, runs_dir: str | Path) -> dict:
    """Mean and std over seeds of every finished run; missing runs are listed, not guessed."""
    out_dir = aggregate_dir(runs_dir, comparison, "comparison")
    cells: dict[tuple[str, float], list[dict]] = {}
    missing = []
    for label, seed, config in experiment_configs(comparison):
        run = RunDir.for_config(config, runs_dir)
        results = run.results() if run.results_path.is_file() else {}
        finished = {row["phase"]: row for row in results.get("levels", [])}
        wanted = ["dense"] if label == "dense" else [f"sparsity-{t:g}" for t in config.prune.sparsities]
        for phase in wanted:
            if phase not in finished:  # levels finish one by one: use those that did
                missing.append(f"{label} seed {seed} {phase}")
                continue
            row = finished[phase]
            cells.setdefault((label, row["target_sparsity"]), []).append({**row, "seed": seed})
    table = []
    for (label, target), rows in sorted(cells.items(), key=lambda kv: (kv[0][1], _order(comparison, kv[0][0]))):
        accs = [r["test_acc"] for r in rows]
        flops = [r.get("flops") or {} for r in rows]
        table.append({
            "method": label, "target_sparsity": target, "seeds": [r["seed"] for r in rows],
            "test_acc_mean": mean_std(accs)["mean"], "test_acc_std": mean_std(accs)["std"],
            "test_acc_median": statistics.median(accs), "test_acc_min": min(accs), "test_acc_max": max(accs),
            "sparsity": statistics.fmean(r["sparsity"] for r in rows),
            "inference_flops": _mean([f.get("inference") for f in flops]),
            "training_flops": _mean([f.get("training") for f in flops]),
        })
    summary = {"name": comparison.name, "complete": not missing, "missing": missing, "rows": table}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "comparison.json", json.dumps(summary, indent=2))
    atomic_write_text(out_dir / "comparison.md", format_markdown(table))
    atomic_write_text(out_dir / "comparison.csv", _csv(table))
    if table:
        from ..analysis.plots import plot_method_comparison

        series: dict[str, list] = {}
        dense = None
        for r in table:
            if r["method"] == "dense":
                dense = r["test_acc_median"]
            else:
                series.setdefault(r["method"], []).append(
                    (r["sparsity"], r["test_acc_median"], r["test_acc_min"], r["test_acc_max"]))
        plot_method_comparison(series, out_dir / "accuracy_vs_sparsity.png", comparison.name, dense)
    summary["dir"] = str(out_dir)
    return summary


def _order(comparison: ComparisonConfig, label: str) -> int:
    labels = ["dense"] + [v.label for v in comparison.variants]
    return labels.index(label) if label in labels else len(labels)


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def format_markdown(table: list[dict]) -> str:
    """Sparsity x method table: accuracy mean +- std and median (n seeds; the median shows
    when one seed failed to train), FLOPs as fractions of dense."""
    lines = [
        "| sparsity | method | test acc. (%) | median | seeds | inference FLOPs | training FLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        def frac(v):
            return "-" if v is None else f"{v:.3f}x"
        lines.append(
            f"| {100 * r['target_sparsity']:g}% | {r['method']} | {100 * r['test_acc_mean']:.2f} ± "
            f"{100 * r['test_acc_std']:.2f} | {100 * r['test_acc_median']:.2f} | {len(r['seeds'])} | {frac(r['inference_flops'])} | {frac(r['training_flops'])} |"
        )
    return "\n".join(lines) + "\n"


def _csv(table: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["method", "target_sparsity", "sparsity", "test_acc_mean", "test_acc_std", "test_acc_median",
            "test_acc_min", "test_acc_max", "inference_flops", "training_flops"]
    w.writerow(cols + ["seeds"])
    for r in table:
        w.writerow([r[c] if r[c] is not None else "" for c in cols] + [" ".join(map(str, r["seeds"]))])
    return buf.getvalue()
