"""Structured-pruning experiments: train dense, remove channels to FLOP targets, fine-tune,
measure what the smaller network really costs (``secateurs structured``).

One run directory per config. The dense network is trained once (``checkpoints/dense.pt``,
per-epoch, resumable). Each entry of ``structured.flops_removed`` is a separate prune of that
trained network: in ``steps`` equal steps the MACs removed grow to the target (after step s,
``target * s / steps`` of the dense MACs are gone), each step choosing channels by the
importance criterion on the current network and then fine-tuning it for ``finetune.epochs``
-- the prune-and-fine-tune loop of Molchanov et al. (2019); ``steps: 1`` is one-shot pruning
followed by fine-tuning (Li et al., 2017).

A pruned network has another architecture than the config's model, so every step's removal
plan (``{group: [unit indices]}``) is written to ``checkpoints/flops-X.plan.json`` before its
fine-tuning starts. On resume the dense network is rebuilt and each plan is applied with
:func:`~secateurs.structured.remove_units` in order, loading every finished step's
fine-tuned weights, so the architecture is reproduced exactly and the per-epoch checkpoint of
the unfinished step loads into it. An interrupted run therefore loses at most one epoch, and
finished levels (rows in ``results.json`` with their ``compact/flops-X.pt2``) are never redone.

Per level the results hold accuracy before and after fine-tuning, the drop against dense,
parameters and MACs (absolute and as a fraction of dense), the share of MACs actually
removed, the exported compact model's on-disk size and accuracy, and CPU latency of the
dense and the pruned network at batch 1 and 64, measured interleaved in the same process.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..data import ImageDataset
from ..errors import CheckpointError, ConfigError, UnknownNameError
from ..structured import (
    IMPORTANCE, ISpaSP, build_graph, load_compact, model_cost, plan_for, prune_to_flops, remove_units,
    save_compact, taylor_importance,
)
from ..validate import check_int, check_number
from ..vocabulary import STRUCTURED_SCOPES
from ..train import Trainer, load_checkpoint, save_checkpoint
from .config import DataConfig, HashedConfig, ModelConfig, PhaseConfig, load_typed, with_model_defaults
from .runs import RunDir, atomic_write_text, execute
from .sweep import _Data, phase_trainer, build_model

__all__ = [
    "StructuredSettings", "StructuredConfig", "load_structured_config", "run_structured",
    "measure_latency", "format_structured", "IMPORTANCES",
]

#: ``taylor`` and ``ispasp`` need data, so they are not in the structured IMPORTANCE registry itself.
IMPORTANCES: tuple[str, ...] = (*IMPORTANCE.names(), "taylor", "taylor2", "ispasp")
LATENCY_BATCHES = (1, 64)
LATENCY_THREADS = 2
LATENCY_NOTE = (
    "CPU latency: median of interleaved repeats (dense and pruned alternate), "
    "torch.set_num_threads(structured.latency_threads) during the measurement; noisy when other jobs share "
    "the CPU. Set OMP_WAIT_POLICY=PASSIVE before Python starts to keep idle OpenMP threads from spinning."
)


@dataclass(frozen=True)
class StructuredSettings:
    """What to remove and how: one level per entry of ``flops_removed`` (share of the dense
    MACs), each reached in ``steps`` prune-and-fine-tune steps."""

    flops_removed: tuple[float, ...] = (0.5,)
    importance: str = "l1"  # l1, bn_scale, taylor (first order), taylor2 (second order) or ispasp
    scope: str = "uniform"  # or "global"; "layerwise" is read as "uniform"
    steps: int = 1
    taylor_batches: int = 10  # probe batches read by the data-driven criteria (taylor, taylor2, ispasp)
    ispasp_iterations: int = 20
    exclude: tuple[str, ...] = ()
    min_channels: int = 1
    latency_repeats: int = 15  # 0: skip the latency measurement
    latency_batches: tuple[int, ...] = LATENCY_BATCHES
    latency_threads: int = LATENCY_THREADS

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCES:
            raise UnknownNameError(
                f"unknown structured.importance {self.importance!r}; known: {', '.join(IMPORTANCES)}"
            )
        object.__setattr__(self, "scope", STRUCTURED_SCOPES.check(self.scope, "structured.scope"))
        if self.importance == "ispasp" and self.scope == "global":
            raise ConfigError(
                "structured.importance ispasp selects a set of a given size in each group, so it cannot "
                "rank channels across groups; set structured.scope: uniform"
            )
        for f in self.flops_removed:
            check_number(f, "structured.flops_removed", above=0.0, below=1.0, hint="each is a share of the dense MACs to remove")
        if len({_phase(f) for f in self.flops_removed}) != len(self.flops_removed):
            raise ConfigError(f"structured.flops_removed {list(self.flops_removed)} repeats a level")
        for name in ("steps", "taylor_batches", "ispasp_iterations", "min_channels", "latency_threads"):
            value = getattr(self, name)
            check_int(value, f"structured.{name}", minimum=1)
        check_int(self.latency_repeats, "structured.latency_repeats", minimum=0)
        for b in self.latency_batches:
            check_int(b, "structured.latency_batches", minimum=1, hint=f"batch sizes, got {list(self.latency_batches)}")


@dataclass(frozen=True)
class StructuredConfig(HashedConfig):
    """A whole structured-pruning experiment (``secateurs structured``)."""

    name: str = "structured"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: PhaseConfig = field(default_factory=PhaseConfig)
    finetune: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=2))
    structured: StructuredSettings = field(default_factory=StructuredSettings)


def load_structured_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> StructuredConfig:
    return load_typed(StructuredConfig, path, overrides, "structured config",
                      prepare=partial(with_model_defaults, kind=StructuredConfig))


def _phase(target: float) -> str:
    return f"flops-{target:g}"


def run_structured(
    config: StructuredConfig,
    run: RunDir,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    dataset: ImageDataset | None = None,
) -> dict:
    """Run (or resume, or re-read) the experiment in ``run``; returns its results."""
    return execute(run, config, lambda data: _Structured(config, run, data, progress, echo).run(), echo=echo, dataset=dataset)


class _Structured:
    def __init__(self, config: StructuredConfig, run: RunDir, dataset: ImageDataset, progress: bool, echo):
        self.config, self.run_dir, self.progress, self.echo = config, run, progress, echo
        self.s = config.structured
        self.data = _Data(config, dataset)
        self.dataset = self.data.dataset
        self.example = self.data.example()

    # -- plumbing -------------------------------------------------------------------------------
    def _trainer(self, model: nn.Module, name: str, phase: PhaseConfig, desc: str) -> Trainer:
        """Seeded by ``derive_seed(seed, "structured", name)``: the dense phase and each step its own stream."""
        return phase_trainer(self.data, self.run_dir, self.config, model, name, phase, None, desc, self.progress,
                             procedure="structured")

    def _dense_model(self) -> nn.Module:
        model = build_model(self.config, self.dataset).to(self.data.device)
        model.load_state_dict(load_checkpoint(self.run_dir.checkpoint("dense"))["model"])
        return model

    def _plan_path(self, phase: str) -> Path:
        return self.run_dir.checkpoints / f"{phase}.plan.json"

    def _compact_path(self, phase: str) -> Path:
        return self.run_dir.path / "compact" / f"{phase}.pt2"

    def _cost(self, model: nn.Module) -> dict:
        cost = model_cost(model, self.example)
        graph = build_graph(model, self.example, self.s.exclude)
        return {"parameters": cost.parameters, "macs": cost.macs,
                "channels": {g.name: g.units for g in graph.prunable}}

    def _export(self, model: nn.Module, phase: str) -> dict:
        """Save the compact model atomically, reload it and check its test accuracy."""
        path = self._compact_path(phase)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        save_compact(model, tmp, self.example)
        os.replace(tmp, path)
        loaded = load_compact(path)
        return {"path": str(path.relative_to(self.run_dir.path)), "bytes": path.stat().st_size,
                "test_acc": _accuracy(loaded, self.data.test)}

    # -- dense ----------------------------------------------------------------------------------
    def dense(self) -> dict:
        model = build_model(self.config, self.dataset)
        trainer = self._trainer(model, "dense", self.config.train, "dense")
        if trainer.resume():
            self.echo(f"resumed dense training at epoch {trainer.state.epoch}/{self.config.train.epochs}")
        history = trainer.fit()
        save_checkpoint(self.run_dir.checkpoint("dense"), trainer.state_dict())
        final = trainer.evaluate(self.data.test)
        return {"test_acc": final["acc"], "test_loss": final["loss"], "epochs": len(history),
                **self._cost(model), "compact": self._export(model, "dense")}

    # -- one level ------------------------------------------------------------------------------
    def _scores(self, model: nn.Module, graph):
        if self.s.importance == "ispasp":  # i-SpaSP selects per removal count: scored inside plan_for
            return ISpaSP(list(itertools.islice(self.data.probe(), self.s.taylor_batches)),
                          iterations=self.s.ispasp_iterations)
        if self.s.importance not in ("taylor", "taylor2"):
            return IMPORTANCE.get(self.s.importance)(model, graph)
        was_training = model.training
        model.eval()  # BN statistics stay as trained; the same probe batches on every resume
        try:
            batches = itertools.islice(self.data.probe(), self.s.taylor_batches)
            return taylor_importance(model, graph, batches, order=2 if self.s.importance == "taylor2" else 1)
        finally:
            model.train(was_training)

    def _plan(self, model: nn.Module, dense_macs: int, total: float) -> tuple[dict[str, list[int]], float]:
        """Units to remove from ``model`` so that ``total`` of the dense MACs are gone."""
        graph = build_graph(model, self.example, self.s.exclude)
        current = model_cost(model, self.example).macs
        fraction = 1.0 - (1.0 - total) * dense_macs / current
        if fraction <= 0.0:
            return {}, 0.0
        scores = self._scores(model, graph)
        _, ratio = prune_to_flops(
            model, self.example, fraction, importance=scores, exclude=self.s.exclude,
            min_channels=self.s.min_channels, scope=self.s.scope,
        )
        return plan_for(model, graph, scores, ratio, self.s.scope, self.s.min_channels), ratio

    def level(self, index: int, target: float, dense: dict) -> dict:
        s, config = self.s, self.config
        phase = _phase(target)
        plan_path = self._plan_path(phase)
        saved: list[dict] = _read_json(plan_path).get("steps", [])
        model = self._dense_model()
        for step in range(1, s.steps + 1):
            name = f"{phase}-step-{step}"
            total = target * step / s.steps
            graph = build_graph(model, self.example, s.exclude)
            if step <= len(saved):
                record = saved[step - 1]
                try:
                    model = remove_units(model, graph, record["plan"])
                except (ConfigError, KeyError) as e:
                    raise CheckpointError(
                        f"{plan_path} step {step} does not fit the network it should prune ({e}); "
                        "delete the run directory to start over"
                    ) from None
            else:
                plan, ratio = self._plan(model, dense["macs"], total)
                model = remove_units(model, graph, plan)
                record = {"step": step, "target_flops_removed": total, "ratio": ratio, "plan": plan}
            desc = f"{phase} step {step}/{s.steps} ({index}/{len(s.flops_removed)})"
            trainer = self._trainer(model, name, config.finetune, desc)
            if trainer.resume():
                self.echo(f"resumed {name} at epoch {trainer.state.epoch}/{config.finetune.epochs}")
            if "acc_before_finetune" not in record:
                if trainer.state.epoch:
                    raise CheckpointError(f"{plan_path} lacks step {step}, whose fine-tuning has started; delete the run directory")
                before = trainer.evaluate(self.data.test)
                macs = model_cost(model, self.example).macs
                record.update(flops_removed=1.0 - macs / dense["macs"], acc_before_finetune=before["acc"],
                              loss_before_finetune=before["loss"])
                saved = saved[: step - 1] + [record]
                atomic_write_text(plan_path, json.dumps({"level": target, "steps": saved}, indent=2))
            trainer.fit()
            save_checkpoint(self.run_dir.checkpoint(name), trainer.state_dict())
            evaluation = trainer.evaluate(self.data.test)
            record["acc_after_finetune"] = evaluation["acc"]
        cost = self._cost(model)
        row: dict[str, Any] = {
            "phase": phase, "target_flops_removed": target,
            "flops_removed": 1.0 - cost["macs"] / dense["macs"],
            "steps": s.steps, "finetune_epochs": s.steps * config.finetune.epochs,
            "acc_before_finetune": saved[-1]["acc_before_finetune"],
            "test_acc": evaluation["acc"], "test_loss": evaluation["loss"],
            "drop_before_finetune_pt": 100.0 * (dense["test_acc"] - saved[-1]["acc_before_finetune"]),
            "drop_pt": 100.0 * (dense["test_acc"] - evaluation["acc"]),
            **cost,
            "parameters_fraction": cost["parameters"] / dense["parameters"],
            "macs_fraction": cost["macs"] / dense["macs"],
            "step_details": [{k: v for k, v in r.items() if k != "plan"} for r in saved],
            "compact": self._export(model, phase),
        }
        if s.latency_repeats:
            latency = measure_latency({"dense": self._dense_model(), "pruned": model}, self.example,
                                      batch_sizes=s.latency_batches, repeats=s.latency_repeats,
                                      threads=s.latency_threads)
            row["latency_ms"] = latency
            row["speedup"] = {b: latency["dense"][b] / latency["pruned"][b] for b in latency["dense"]}
        return row

    # -- the whole run --------------------------------------------------------------------------
    def run(self) -> dict:
        config, run = self.config, self.run_dir
        results = run.results()
        results.update(
            config_hash=config.short_hash(), name=config.name, model=config.model.name,
            dataset=self.dataset.name, seed=config.seed, importance=self.s.importance,
            scope=self.s.scope, steps=self.s.steps, latency_note=LATENCY_NOTE, latency_threads=self.s.latency_threads,
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        )
        rows: dict[str, dict] = {r["phase"]: r for r in results.get("levels", [])}
        dense = results.get("dense")
        if not (dense and run.checkpoint("dense").is_file() and self._compact_path("dense").is_file()):
            dense = results["dense"] = self.dense()
            self._save(results, rows, complete=False)
        for index, target in enumerate(self.s.flops_removed, start=1):
            phase = _phase(target)
            if phase in rows and self._compact_path(phase).is_file():
                continue
            rows[phase] = self.level(index, target, dense)
            self._save(results, rows, complete=False)
        self._save(results, rows, complete=True)
        return run.results()

    def _save(self, results: dict, rows: dict[str, dict], complete: bool) -> None:
        order = {_phase(t): i for i, t in enumerate(self.s.flops_removed)}
        levels = sorted((r for r in rows.values() if r["phase"] in order), key=lambda r: order[r["phase"]])
        out = {**results, "complete": complete, "levels": levels}
        self.run_dir.write_results(out)
        atomic_write_text(self.run_dir.path / "structured.md", format_structured(out))


# -- measurement ----------------------------------------------------------------------------------
@torch.inference_mode()
def _accuracy(model: Callable[[torch.Tensor], torch.Tensor], data) -> float:
    correct = count = 0
    for x, y in data:
        x, y = x.cpu(), y.cpu()
        correct += int((model(x).argmax(dim=1) == y).sum())
        count += int(y.shape[0])
    return correct / count if count else math.nan


def measure_latency(
    models: Mapping[str, nn.Module],
    example: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = LATENCY_BATCHES,
    repeats: int = 15,
    threads: int = LATENCY_THREADS,
    min_seconds: float = 0.02,
) -> dict[str, dict[str, float]]:
    """CPU milliseconds per forward pass: ``{model: {"batch_N": ms}}``.

    Every model runs on the same input in eval mode under ``torch.inference_mode``, after a
    warm-up. Each repeat times a loop of calls lasting about ``min_seconds``; the models
    alternate within every repeat (in reversed order every other repeat) so a change of load
    on the machine hits all of them alike, and the median over repeats is reported. The
    intra-op thread count is ``threads`` during the measurement and restored afterwards.
    """
    cpu = {name: copy.deepcopy(m).cpu().eval() for name, m in models.items()}
    names = list(cpu)
    previous = torch.get_num_threads()
    out: dict[str, dict[str, float]] = {name: {} for name in names}
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for batch in batch_sizes:
                x = example[:1].detach().cpu().expand(batch, *example.shape[1:]).contiguous()
                loops = {}
                for name, m in cpu.items():
                    for _ in range(3):
                        m(x)
                    start = time.perf_counter()
                    m(x)
                    loops[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
                samples: dict[str, list[float]] = {name: [] for name in names}
                for r in range(repeats):
                    for name in names if r % 2 == 0 else names[::-1]:
                        m, n = cpu[name], loops[name]
                        start = time.perf_counter()
                        for _ in range(n):
                            m(x)
                        samples[name].append((time.perf_counter() - start) / n)
                for name in names:
                    out[name][f"batch_{batch}"] = 1000.0 * statistics.median(samples[name])
    finally:
        torch.set_num_threads(previous)
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is corrupted ({e}); delete the run directory to start over") from None


# -- report ---------------------------------------------------------------------------------------
def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def format_structured(results: dict) -> str:
    """Markdown: the dense network, then one row per level."""
    dense = results.get("dense") or {}
    batches = list(dict.fromkeys(
        int(k.split("_")[1]) for row in results.get("levels", []) for k in (row.get("latency_ms") or {}).get("dense", {})
    )) or list(LATENCY_BATCHES)
    head = ("| level | FLOPs removed | params | MACs | acc. before FT (%) | acc. after FT (%) | drop (pt) | "
            + "".join(f"batch-{b} ms dense / pruned | " for b in batches) + "compact size (KB) |")
    lines = [
        f"{results.get('model', '')} on {results.get('dataset', '')}: importance {results.get('importance')}, "
        f"scope {results.get('scope')}, {results.get('steps')} prune step(s) per level"
        + ("" if results.get("complete") else " — INCOMPLETE (re-run the same command to resume)"),
        "", head, "|" + "---|" * (8 + len(batches)),
    ]
    if dense:
        lines.append(
            f"| dense | 0% | {_count(dense['parameters'])} | {_count(dense['macs'])} | - | "
            f"{100 * dense['test_acc']:.2f} | - | " + "- | " * len(batches) + f"{dense['compact']['bytes'] / 1024:.0f} |"
        )
    for row in results.get("levels", []):
        lat = row.get("latency_ms")

        def ms(batch: int) -> str:
            if not lat or f"batch_{batch}" not in lat["dense"]:
                return "-"
            d, p = lat["dense"][f"batch_{batch}"], lat["pruned"][f"batch_{batch}"]
            return f"{d:.3g} / {p:.3g} ({d / p:.2f}x)"

        lines.append(
            f"| {100 * row['target_flops_removed']:g}% | {100 * row['flops_removed']:.1f}% | "
            f"{_count(row['parameters'])} ({100 * row['parameters_fraction']:.0f}%) | "
            f"{_count(row['macs'])} ({100 * row['macs_fraction']:.0f}%) | "
            f"{100 * row['acc_before_finetune']:.2f} | {100 * row['test_acc']:.2f} | {row['drop_pt']:+.2f} | "
            + "".join(f"{ms(b)} | " for b in batches) + f"{row['compact']['bytes'] / 1024:.0f} |"
        )
    lines += ["", f"acc. before FT: right after the (last) prune step; "
              f"drop = dense accuracy - pruned accuracy after fine-tuning (pt); latency in ms per forward pass "
              f"(speedup in brackets). {results.get('latency_note', LATENCY_NOTE)} Measured with "
              f"{results.get('latency_threads')} thread(s); OMP_WAIT_POLICY was {results.get('omp_wait_policy') or 'unset'}."]
    return "\n".join(lines) + "\n"
