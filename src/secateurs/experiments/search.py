"""Architecture search under a device budget, every strategy side by side (``secateurs search``).

One config names a dataset, a search space (:class:`~secateurs.search.space.SearchSpace`), a
budget (:class:`~secateurs.search.cost.Budget`: predicted latency on this machine, peak
memory, MACs) and the training every candidate gets. For each search seed it runs:

* **pnas**: progressive search with a surrogate (:class:`~secateurs.search.pnas.PNAS`, Liu et
  al. 2018): level 1 trains one-block candidates, each later level trains the ``k`` children
  the surrogate ranks best; the surrogate is refit on every level's validation accuracies;
* **random**: as many candidates as PNAS trained for that seed, drawn uniformly from the
  space among those within budget (random search at equal cost);
* **dnas**: the differentiable search with block and layer pruning
  (:mod:`secateurs.search.dnas`, Kierat et al. 2022); the derived network is retrained from
  scratch like any candidate;
* **grow_prune**: the grow-and-prune MLP search (:mod:`secateurs.grow.heuristic`); its final
  widths are retrained from scratch like any candidate;
* **zoo**: the hand-designed models named in ``zoo`` (e.g. LeNet-300-100, LeNet-5).

Every trained network is a **unit** (:class:`CandidateConfig`: architecture or zoo name, data,
training, seed), so the same candidate proposed twice (by two strategies, or by one after a
restart) is trained once, units run on any executor (``--executor processes:2`` / ``ray``),
and an interrupted search resumes: finished units are reused and PNAS replays their results,
which gives it the same proposals (its surrogate is refit deterministically from them).

Searches select by **validation** accuracy (``data.validation`` images held out); the table
and the Pareto front report **test** accuracy and the latency each network **measured** here
at batch 1 on one thread. Search cost is CPU-hours: every unit's wall time x its threads.

Outputs in ``<runs_dir>/<name>-<hash>-search/``: ``search.json``, ``search.md``,
``candidates.csv``, ``pareto.png`` (test accuracy vs measured latency, every strategy, with
each strategy's front) and ``surrogate.png`` (PNAS's rank correlation by level).
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import ConfigError
from ..grow.heuristic import GrowPruneConfig
from ..search.cost import Budget, LatencyTable, candidate_costs, check_budget_feasible, macs, measure_latency, peak_memory
from ..search.space import Architecture, InputShape, SearchSpace, build
from ..seeding import derive_seed
from ..validate import check_int
from .config import DataConfig, HashedConfig, PhaseConfig, aggregate_dir, load_typed
from .runs import RunDir, atomic_write_text, execute

__all__ = [
    "STRATEGIES", "CandidateConfig", "SearchConfig", "load_search_config", "run_candidate", "run_search",
    "pareto_front", "hypervolume", "format_search",
]

STRATEGIES = ("pnas", "random", "dnas", "grow_prune", "zoo")


@dataclass(frozen=True)
class PNASSettings:
    """PNAS's meta-parameters: ``k`` children trained per level (the beam), ``first_level``
    one-block candidates trained at level 1 (None: all of them), ``members`` surrogate MLPs,
    ``indicators``: TE-NAS indicators as extra surrogate features."""

    k: int = 4
    first_level: int | None = 8
    members: int = 5
    indicators: bool = False

    def __post_init__(self) -> None:
        check_int(self.k, "pnas.k", minimum=1, hint="children trained per level")
        check_int(self.first_level, "pnas.first_level", minimum=1, optional=True,
                  hint="one-block candidates trained at level 1 (null: all)")
        check_int(self.members, "pnas.members", minimum=1, hint="MLPs in the surrogate ensemble")


@dataclass(frozen=True)
class GrowPruneSettings:
    """The grow-and-prune search: ``cycles`` phases of ``train.epochs`` from an MLP ``start``."""

    start: tuple[int, ...] = (16,)
    cycles: int = 4
    grow_prune: GrowPruneConfig = field(default_factory=lambda: GrowPruneConfig(max_params=100_000))


@dataclass(frozen=True)
class SearchConfig(HashedConfig):
    """A whole search study; see the module docstring. ``dnas`` holds the DNAS unit's settings
    (:class:`secateurs.experiments.dnas.DNASUnitConfig` fields other than name / seed / device /
    data / latency_table)."""

    name: str = "search"
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="fashion-mnist", validation=5000))
    space: SearchSpace = field(default_factory=SearchSpace)
    budget: Budget = field(default_factory=Budget)
    train: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=1))
    strategies: tuple[str, ...] = STRATEGIES
    search_seeds: tuple[int, ...] = (0, 1, 2)
    pnas: PNASSettings = field(default_factory=PNASSettings)
    dnas: dict[str, Any] = field(default_factory=dict)
    grow_prune: GrowPruneSettings = field(default_factory=GrowPruneSettings)
    zoo: tuple[str, ...] = ("lenet300_100", "lenet5")
    latency_repeats: int = 50

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ConfigError(f"strategies must list some of {', '.join(STRATEGIES)}, got {list(self.strategies)}")
        if "random" in self.strategies and "pnas" not in self.strategies:
            raise ConfigError("random search trains as many candidates as PNAS did; list pnas too, or drop random")
        if not self.search_seeds or len(set(self.search_seeds)) != len(self.search_seeds):
            raise ConfigError(f"search_seeds must list distinct seeds (at least one), got {list(self.search_seeds)}")
        if self.data.validation < 1:
            raise ConfigError("a search selects by validation accuracy: set data.validation (images held out, "
                              "e.g. 5000); the test set is only for the report")
        check_int(self.latency_repeats, "latency_repeats", minimum=3)


def load_search_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> SearchConfig:
    return load_typed(SearchConfig, path, overrides, "search config")


# -- one candidate: a unit -------------------------------------------------------------------------
@dataclass(frozen=True)
class CandidateConfig(HashedConfig):
    """One network trained and measured: ``architecture`` (a space candidate, as its dict) or
    ``zoo`` (a zoo model's name), with ``train`` on ``data``, initialised and shuffled from ``seed``."""

    name: str = "candidate"
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    architecture: dict | None = None
    zoo: str | None = None
    train: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=1))
    latency_repeats: int = 50

    def label(self) -> str:
        return self.zoo or Architecture.from_dict(self.architecture).label


def run_candidate(config: CandidateConfig, run: RunDir, *, progress: bool = True, echo: Callable[[str], None] = print,
                  wait: bool = False, dataset=None) -> dict:
    """Train the candidate (resuming from its per-epoch checkpoint), then measure it: validation
    and test accuracy, parameters, MACs, peak memory (space candidates) and latency at batch 1 on
    one thread, measured and (space candidates) predicted."""
    if (config.architecture is None) == (config.zoo is None):
        raise ConfigError("a candidate is either an architecture or a zoo model name, exactly one")
    return execute(run, config, lambda data: _train_candidate(config, run, data, progress, echo), echo=echo,
                   dataset=dataset, wait=wait)


def _train_candidate(config: CandidateConfig, run: RunDir, dataset, progress: bool, echo) -> dict:
    from ..analysis.flops import layer_macs
    from ..models import create_model
    from ..train import Trainer
    from .sweep import _Data, _train_config

    start = time.perf_counter()
    data = _Data(config, dataset)
    ds = data.dataset
    shape = InputShape(ds.in_channels, ds.image_size[0], ds.num_classes)
    torch.manual_seed(derive_seed(config.seed, "search", "init"))
    if config.zoo is not None:
        model = create_model(config.zoo, num_classes=shape.classes, in_channels=shape.channels, image_size=shape.size)
        arch = None
    else:
        arch = Architecture.from_dict(config.architecture)
        model = build(arch, shape)
    model = model.to(data.device)
    cfg = _train_config(config.train, config, derive_seed(config.seed, "search", "train"), health="mark")
    trainer = Trainer(model, data.train(cfg.seed), cfg, eval_data=data.test, val_data=data.val,
                      checkpoint_path=run.checkpoint("train"), callbacks=[lambda r: run.log(r)],
                      progress=progress, progress_desc=config.label())
    if trainer.resume():
        echo(f"resumed {config.label()} at epoch {trainer.state.epoch}/{cfg.epochs}")
    trainer.fit()
    test, val = trainer.evaluate(data.test), trainer.evaluate(data.val)
    model = model.cpu().eval()
    example = torch.zeros(1, shape.channels, shape.size, shape.size)
    results = {
        "complete": True, "label": config.label(), "seed": config.seed,
        "architecture": config.architecture, "zoo": config.zoo,
        "val_acc": val["acc"], "test_acc": test["acc"], "health": trainer.health,
        "parameters": sum(p.numel() for p in model.parameters()),
        "macs": macs(arch, shape) if arch is not None else sum(layer_macs(model, example).values()),
        "memory_mb": peak_memory(arch, shape) / 2**20 if arch is not None else None,
        "latency_ms": 1e3 * measure_latency(model, example, repeats=config.latency_repeats, threads=1),
        "threads": torch.get_num_threads(),
    }
    results["cpu_seconds"] = (time.perf_counter() - start) * results["threads"]
    run.write_results(results)
    return results


# -- the study ------------------------------------------------------------------------------------
class _Study:
    """Holds what every strategy shares: the shape, the latency table, the budget filter and
    the units finished so far (by config, so a candidate proposed twice trains once)."""

    def __init__(self, config: SearchConfig, runs_dir: Path, executor, threads, progress, echo):
        from .runner import cached_dataset

        self.config, self.runs_dir, self.executor, self.threads = config, runs_dir, executor, threads
        self.progress, self.echo = progress, echo
        ds = cached_dataset(config.data.dataset, config.data.root)
        self.shape = InputShape(ds.in_channels, ds.image_size[0], ds.num_classes)
        self.table = LatencyTable.open(runs_dir / "latency-table.json", batch=1, threads=1, echo=echo)
        self.done: dict[str, dict | None] = {}  # by run name (name + config hash)
        self.failed: list[dict] = []

    def probe_images(self, n: int = 8) -> torch.Tensor:
        """The first ``n`` training images, normalised as training sees them (TE-NAS measures on data)."""
        from .runner import cached_dataset
        from .sweep import _Data

        data = _Data(self.config, cached_dataset(self.config.data.dataset, self.config.data.root))
        return data.transform(data.dataset.train_images[:n]).cpu()

    def costs(self, arch: Architecture) -> dict:
        return candidate_costs(arch, self.shape, self.table)

    def admits(self, arch: Architecture) -> bool:
        return self.config.budget.admits(self.costs(arch))

    def candidate(self, seed: int, arch: Architecture | None = None, model: str | None = None) -> CandidateConfig:
        c = self.config
        return CandidateConfig(name=f"candidate-{model or arch.label}", seed=seed, device=c.device, data=c.data,
                               architecture=arch.to_dict() if arch is not None else None, zoo=model, train=c.train,
                               latency_repeats=c.latency_repeats)

    def run(self, work: Sequence[tuple[str, Any, Callable, dict]]) -> None:
        """Run the ``(key, config, fn, kwargs)`` units not finished yet, one per distinct
        config; :meth:`result` then reads each (None for a unit that failed)."""
        from .runner import Unit, failures, run_units

        units, seen = [], set()
        for key, config, fn, kwargs in work:
            if config.run_name() in seen or config.run_name() in self.done:
                continue
            seen.add(config.run_name())
            units.append(Unit(key, config, fn, kwargs))
        if units:
            outcomes = run_units(units, self.runs_dir, self.executor, progress=self.progress, echo=self.echo,
                                 threads=self.threads)
            for unit, outcome in zip(units, outcomes):
                self.done[unit.config.run_name()] = outcome.results if outcome.ok else None
            self.failed += failures(outcomes)

    def result(self, config) -> dict | None:
        """A finished unit's results (None: not run, or failed)."""
        return self.done.get(config.run_name())


def run_search(config: SearchConfig, runs_dir: str | Path, *, executor="local", threads: int | None = None,
               progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) every strategy of ``config`` for every search seed; write and return the
    summary (see the module docstring)."""
    from ..models import create_model
    from .runner import cached_dataset

    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    cached_dataset(config.data.dataset, config.data.root)  # a missing dataset fails before anything runs
    study = _Study(config, runs_dir, executor, threads, progress, echo)
    for name in config.zoo if "zoo" in config.strategies else ():  # a zoo model that cannot read these images
        create_model(name, num_classes=study.shape.classes, in_channels=study.shape.channels, image_size=study.shape.size)
    check_budget_feasible(config.budget, config.space, study.shape, study.table)
    rows: list[dict] = []  # one per (strategy, seed, trained network)
    searches: dict[str, dict[int, dict]] = {s: {} for s in config.strategies}

    def add(strategy: str, seed: int, candidate: CandidateConfig, extra: dict | None = None) -> None:
        results = study.result(candidate)
        if results is not None:
            arch = candidate.architecture and Architecture.from_dict(candidate.architecture)
            predicted = study.costs(arch)["latency_ms"] if arch else None
            rows.append({"strategy": strategy, "search_seed": seed, "architecture": candidate.architecture,
                         **{k: results[k] for k in (
                "label", "val_acc", "test_acc", "parameters", "macs", "memory_mb", "latency_ms", "cpu_seconds")},
                "predicted_latency_ms": predicted, **(extra or {})})

    first: list = []  # independent units, batched with PNAS's first level
    dnas_units, grow_units = {}, {}
    if "zoo" in config.strategies:
        first += [(f"zoo {m} seed {s}", study.candidate(s, model=m), run_candidate, {})
                  for s in config.search_seeds for m in config.zoo]
    if "dnas" in config.strategies:
        from .dnas import run_dnas_unit

        dnas_units = {s: _dnas_config(config, s, runs_dir) for s in config.search_seeds}
        first += [(f"dnas search seed {s}", c, run_dnas_unit, {}) for s, c in dnas_units.items()]
    if "grow_prune" in config.strategies:
        from .grow_prune import run_grow_prune

        grow_units = {s: _grow_prune_config(config, s) for s in config.search_seeds}
        first += [(f"grow_prune search seed {s}", c, _grow_prune_unit, {}) for s, c in grow_units.items()]
        _ = run_grow_prune  # imported here so a missing piece fails before training

    pnas = {}
    if "pnas" in config.strategies:
        pnas = {s: _make_pnas(config, study, s) for s in config.search_seeds}
    halted: dict[int, str] = {}  # a seed whose candidate failed to train stops there (PNAS needs every accuracy)
    while True:
        proposals = {s: p.propose() for s, p in pnas.items() if s not in halted and not p.done}
        proposals = {s: a for s, a in proposals.items() if a}
        work = [(f"pnas L{pnas[s].level} seed {s} {a.label}", study.candidate(s, a), run_candidate, {})
                for s, archs in proposals.items() for a in archs]
        if not work and not first:
            break
        study.run(first + work)
        first = []
        for s, archs in proposals.items():
            found = {a: study.result(study.candidate(s, a)) for a in archs}
            if any(r is None for r in found.values()):
                halted[s] = f"level {pnas[s].level}: a candidate failed to train (see failed); the search stopped there"
                continue
            for a in archs:
                add("pnas", s, study.candidate(s, a), {"level": pnas[s].level})
            pnas[s].observe({a: r["val_acc"] for a, r in found.items()})
        if not proposals:
            break

    final: list = []
    for s, p in pnas.items():
        searches["pnas"][s] = {"history": [level.to_dict() for level in p.history], "trained": p.trained,
                               "stopped": halted.get(s) or p.stopped}
    if "random" in config.strategies:
        for s in config.search_seeds:
            n = searches["pnas"][s]["trained"]
            archs = _random_candidates(config, study, s, n)
            searches["random"][s] = {"trained": len(archs)}
            final += [(f"random seed {s} {a.label}", study.candidate(s, a), run_candidate, {}) for a in archs]
    for s, c in dnas_units.items():
        results = study.result(c)
        if results is not None:
            arch = Architecture.from_dict(results["architecture"])
            searches["dnas"][s] = {"architecture": arch.label, "cpu_seconds": results.get("search_seconds", 0.0)
                                   * (results.get("threads") or 1), "history": results.get("history")}
            final.append((f"dnas derived seed {s} {arch.label}", study.candidate(s, arch), run_candidate, {}))
    for s, c in grow_units.items():
        results = study.result(c)
        if results is not None:
            arch = Architecture.mlp(results["final"]["widths"])
            searches["grow_prune"][s] = {"architecture": arch.label, "cpu_seconds": results.get("cpu_seconds", 0.0),
                                         "search_test_acc": results["final"]["test_acc"]}
            final.append((f"grow_prune final seed {s} {arch.label}", study.candidate(s, arch), run_candidate, {}))
    study.run(final)
    for key, candidate, _, _ in final:
        add(key.split()[0], candidate.seed, candidate)
    if "random" in config.strategies:
        for s, p in pnas.items():
            searches["pnas"][s]["held_out"] = _held_out_correlation(config, study, s, p, rows)
    if "zoo" in config.strategies:
        for s in config.search_seeds:
            for m in config.zoo:
                add("zoo", s, study.candidate(s, model=m))
    summary = _summarize(config, rows, searches, study)
    if "pnas" in config.strategies:
        summary["indicator_ablation"] = _indicator_ablation(config, study, rows)
    return _write(config, runs_dir, summary)


def _make_pnas(config: SearchConfig, study: _Study, seed: int):
    from ..search.pnas import PNAS

    p = config.pnas
    kwargs = dict(k=p.k, seed=derive_seed(seed, "search", "pnas"), admits=study.admits, first_level=p.first_level,
                  surrogate={"members": p.members})
    if p.indicators:
        from ..search.pnas import indicator_features

        kwargs["features"] = indicator_features(study.shape, study.probe_images(), seed=derive_seed(seed, "search", "indicators"))
    return PNAS(config.space, study.shape, **kwargs)


def _held_out_correlation(config: SearchConfig, study: "_Study", seed: int, search, rows: list[dict]) -> list[dict]:
    """The surrogate's rank correlation, level by level, on a held-out set: the random-search
    candidates of the same seed (drawn from the whole space, trained the same way). The
    surrogate after level b is refit exactly as PNAS refit it (a fresh search replaying the
    same accuracies), then scored on candidates it never saw."""
    from ..search.pnas import rank_correlation

    held = [r for r in rows if r["strategy"] == "random" and r["search_seed"] == seed]
    archs = [Architecture.from_dict(r["architecture"]) for r in held]
    truth = [r["val_acc"] for r in held]
    keep = [i for i, a in enumerate(archs) if a not in search.observed]  # only candidates PNAS never trained
    if len(keep) < 3:
        return []
    replay, out = _make_pnas(config, study, seed), []
    for level in search.history:
        if level.accuracies is None:
            break
        replay.propose()
        replay.observe(dict(zip(level.proposed, level.accuracies)))
        mean, _ = replay.predict([archs[i] for i in keep])
        out.append({"level": level.level, "trained": replay.trained, "held_out": len(keep),
                    "spearman": rank_correlation(mean.numpy(), [truth[i] for i in keep])})
    return out


def _indicator_ablation(config: SearchConfig, study: "_Study", rows: list[dict], folds: int = 5) -> dict | None:
    """Do the TE-NAS indicators help the surrogate? Over every space candidate the study trained
    (mean validation accuracy over the seeds that trained it), ``folds``-fold cross-validation
    of PNAS's surrogate on the space features alone and with the two indicators appended:
    Spearman's rho of the out-of-fold predictions. Both use the same folds and seeds."""
    from ..search.pnas import IndicatorFeatures, Surrogate, rank_correlation

    accs: dict[Architecture, list[float]] = {}
    for r in rows:
        if r.get("architecture"):
            accs.setdefault(Architecture.from_dict(r["architecture"]), []).append(r["val_acc"])
    archs = list(accs)
    if len(archs) < 2 * folds:
        return None
    y = torch.tensor([statistics.fmean(accs[a]) for a in archs], dtype=torch.float64)
    base = torch.stack([config.space.features(a) for a in archs])
    images = study.probe_images(16)
    extra = IndicatorFeatures(study.shape, images[:8], region_inputs=images, seed=derive_seed(config.seed, "search", "ablation"))
    start = time.perf_counter()
    with_indicators = torch.cat([base, torch.stack([extra(a) for a in archs])], dim=1)
    seconds = time.perf_counter() - start
    order = torch.randperm(len(archs), generator=torch.Generator().manual_seed(derive_seed(config.seed, "search", "folds")))
    out = {}
    for name, X in (("space features", base), ("space features + TE-NAS indicators", with_indicators)):
        predicted = torch.zeros(len(archs), dtype=torch.float64)
        for f in range(folds):
            test = order[f::folds]
            train = torch.tensor([i for i in order.tolist() if i not in set(test.tolist())])
            surrogate = Surrogate(members=config.pnas.members, seed=derive_seed(config.seed, "search", "ablation", f))
            predicted[test] = surrogate.fit(X[train], y[train]).predict(X[test])[0]
        out[name] = rank_correlation(predicted.numpy(), y.numpy())
    return {"candidates": len(archs), "folds": folds, "spearman": out, "indicator_seconds": seconds}


def _random_candidates(config: SearchConfig, study: _Study, seed: int, n: int) -> list[Architecture]:
    """``n`` distinct candidates within budget, drawn uniformly by the space's sampler."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "search", "random"))
    out: list[Architecture] = []
    for _ in range(1000 * max(n, 1)):
        if len(out) == n:
            break
        arch = config.space.sample(generator, study.shape)
        if arch not in out and study.admits(arch):
            out.append(arch)
    if len(out) < n:
        raise ConfigError(f"random search found only {len(out)} distinct candidates within the budget, PNAS trained {n}; "
                          "widen the space or loosen the budget")
    return out


def _dnas_config(config: SearchConfig, seed: int, runs_dir: Path):
    """The DNAS unit of one search seed: its supernet offers the space's ops and widths, and a
    latency budget becomes its latency target (seconds), unless ``dnas.search`` sets them."""
    from ..typed_config import from_dict
    from .dnas import DNASUnitConfig

    space, extra = config.space, dict(config.dnas)
    owned = sorted(set(extra) & {"name", "seed", "device", "data", "latency_table"})
    if owned:  # never silently replaced: the study sets these for every unit
        raise ConfigError(f"dnas.{owned[0]} is set by the search study (from its name, search_seeds, device, data and "
                          "<runs-dir>/latency-table.json); remove it from the dnas section")
    search = {"ops": list(space.ops), "widths": list(space.conv_widths), "fc_widths": list(space.fc_widths),
              "fc_layers": space.max_fc}
    if config.budget.latency_ms is not None:
        search["latency_target"] = config.budget.latency_ms / 1e3
    search.update(extra.pop("search", {}) or {})
    if extra.get("latency", "table") == "table":  # the study's table, shared by every unit
        extra["latency_table"] = str(runs_dir / "latency-table.json")
    return from_dict(DNASUnitConfig, {**extra, "search": search, "name": f"{config.name}-dnas", "seed": seed,
                                      "device": config.device, "data": dataclasses.asdict(config.data)})


def _grow_prune_config(config: SearchConfig, seed: int):
    from .grow_prune import GrowPruneExperimentConfig

    g = config.grow_prune
    return GrowPruneExperimentConfig(name=f"{config.name}-grow-prune", seed=seed, device=config.device,
                                     data=config.data, start=g.start, cycles=g.cycles, train=config.train,
                                     grow_prune=g.grow_prune, baselines=False)


def _grow_prune_unit(config, run: RunDir, *, progress: bool = True, echo=print, wait: bool = False, dataset=None) -> dict:
    """The grow-and-prune search as a unit, with its CPU time recorded (a module-level function:
    workers import it)."""
    from .grow_prune import run_grow_prune

    start = time.perf_counter()
    results = run_grow_prune(config, run, progress=progress, echo=echo, dataset=dataset)
    if "cpu_seconds" not in results:
        results = {**results, "cpu_seconds": (time.perf_counter() - start) * torch.get_num_threads()}
        run.write_results(results)
    return results


# -- the report -----------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (lower latency and higher accuracy, one of
    them strictly), sorted by latency. Points are ``(latency, accuracy)``; ties keep the first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def hypervolume(points: Sequence[tuple[float, float]], max_latency: float) -> float:
    """The area dominated by ``points`` in [0, max_latency] x [0, 1] (latency, accuracy): one
    number per front, larger is better; points above ``max_latency`` add nothing."""
    inside = [p for p in points if p[0] <= max_latency]
    front = [inside[i] for i in pareto_front(inside)]
    area = 0.0
    for j, (lat, acc) in enumerate(front):
        right = front[j + 1][0] if j + 1 < len(front) else max_latency
        area += (right - lat) * acc
    return area


def _summarize(config: SearchConfig, rows: list[dict], searches: dict, study: _Study) -> dict:
    budget = config.budget
    latencies = [r["latency_ms"] for r in rows]
    reference = budget.latency_ms or (max(latencies) if latencies else 1.0)
    per: list[dict] = []
    for strategy in config.strategies:
        for seed in config.search_seeds:
            mine = [r for r in rows if r["strategy"] == strategy and r["search_seed"] == seed]
            if not mine:
                continue
            within = [r for r in mine if _within(budget, r)]
            best = max(within, key=lambda r: (r["val_acc"], -r["latency_ms"])) if within else None
            cpu = sum(r["cpu_seconds"] for r in mine) + (searches.get(strategy, {}).get(seed, {}).get("cpu_seconds") or 0.0)
            per.append({
                "strategy": strategy, "search_seed": seed, "trained": len(mine), "within_budget": len(within),
                "best": best and {k: best[k] for k in ("label", "val_acc", "test_acc", "latency_ms", "parameters", "macs")},
                "hypervolume": hypervolume([(r["latency_ms"], r["test_acc"]) for r in mine], reference),
                "cpu_hours": cpu / 3600,
            })
    table = []
    for strategy in config.strategies:
        cells = [p for p in per if p["strategy"] == strategy]
        if not cells:
            continue
        bests = [p["best"]["test_acc"] for p in cells if p["best"]]
        table.append({
            "strategy": strategy, "seeds": len(cells), "trained": statistics.fmean(p["trained"] for p in cells),
            "best_test_acc": _ms(bests), "best_latency_ms": _ms([p["best"]["latency_ms"] for p in cells if p["best"]]),
            "hypervolume": _ms([p["hypervolume"] for p in cells]), "cpu_hours": _ms([p["cpu_hours"] for p in cells]),
            "best_labels": [p["best"]["label"] if p["best"] else None for p in cells],
        })
    correlation = _surrogate_correlation(searches.get("pnas", {}))
    errors = sorted(abs(r["predicted_latency_ms"] / r["latency_ms"] - 1) for r in rows
                    if r.get("predicted_latency_ms") and r["latency_ms"])
    prediction = errors and {"networks": len(errors), "median_abs_error": statistics.median(errors),
                             "p90_abs_error": errors[min(len(errors) - 1, int(0.9 * len(errors)))],
                             "max_abs_error": errors[-1]}
    return {"name": config.name, "complete": not study.failed, "budget": budget.to_dict(), "budget_text": str(budget),
            "shape": dataclasses.asdict(study.shape), "machine": study.table.machine, "reference_latency_ms": reference,
            "table": table, "per_seed": per, "candidates": rows, "searches": searches,
            "surrogate_correlation": correlation, "latency_prediction": prediction or None, "failed": study.failed}


def _within(budget: Budget, row: Mapping[str, Any]) -> bool:
    """Whether a trained network meets the budget on its *measured* latency (and its memory
    and MACs); a cost the row lacks (a zoo model's peak memory) does not meet a limit on it."""
    return all(row.get(m) is not None and row[m] <= getattr(budget, m) for m in budget.limited)


def _ms(values: Sequence[float]) -> dict | None:
    from ..analysis.report import mean_std

    return mean_std(values) if values else None


def _surrogate_correlation(pnas: Mapping[int, dict]) -> list[dict]:
    """Per search seed, for the surrogate refit after each level L, Spearman's rho between its
    predictions and trained validation accuracy: ``held_out`` on the random-search candidates
    PNAS never trained, and ``proposed`` on the level-(L+1) children it chose (predicted before
    they were trained; all near the top of its ranking, so a noisier measure)."""
    out = []
    for seed, search in sorted(pnas.items()):
        held = {h["level"]: h["spearman"] for h in search.get("held_out", [])}
        chosen = {e["level"] - 1: e.get("rank_correlation") for e in search.get("history", [])}
        for level in sorted(set(held) | {lv for lv, rho in chosen.items() if lv >= 1}):
            proposed = chosen.get(level)
            out.append({"search_seed": seed, "level": level, "held_out": held.get(level),
                        "proposed": None if proposed is None or math.isnan(proposed) else proposed})
    return [c for c in out if c["proposed"] is not None or c["held_out"] is not None]


def _write(config: SearchConfig, runs_dir: Path, summary: dict) -> dict:
    out = aggregate_dir(runs_dir, config, "search")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "search.json", json.dumps(summary, indent=2, default=str))
    atomic_write_text(out / "search.md", format_search(summary))
    atomic_write_text(out / "candidates.csv", _csv(summary["candidates"]))
    if summary["candidates"]:
        plot_pareto(summary, out / "pareto.png")
    if summary["surrogate_correlation"]:
        plot_surrogate(summary["surrogate_correlation"], out / "surrogate.png")
    summary["dir"] = str(out)
    return summary


def _fmt(cell: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not cell:
        return "-"
    return f"{scale * cell['mean']:.{digits}f} ± {scale * cell['std']:.{digits}f}"


def format_search(summary: dict) -> str:
    """One row per strategy: mean ± std over search seeds of the best network within budget
    (chosen by validation accuracy; test accuracy and measured latency shown), the front's
    hypervolume, and the search cost."""
    lines = [
        f"Budget: {summary['budget_text']} (the best network is chosen among those whose measured costs meet it); "
        f"hypervolume over latency [0, {summary['reference_latency_ms']:.3g}] ms x accuracy [0, 1].",
        "",
        "| strategy | seeds | trained | best test acc. (%) | its latency (ms) | hypervolume | CPU-hours | best (per seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["table"]:
        lines.append(
            f"| {r['strategy']} | {r['seeds']} | {r['trained']:.3g} | {_fmt(r['best_test_acc'], 100)} | "
            f"{_fmt(r['best_latency_ms'], 1, 3)} | {_fmt(r['hypervolume'], 1, 4)} | {_fmt(r['cpu_hours'], 1, 3)} | "
            f"{', '.join(label or '-' for label in r['best_labels'])} |"
        )
    if summary["surrogate_correlation"]:
        lines += ["", "PNAS surrogate, Spearman rho with trained validation accuracy (mean ± std over seeds): on the "
                  "random-search candidates it never saw, and on the next level's children it chose (predicted "
                  "before they were trained), for the surrogate refit after each level:", "",
                  "| surrogate after level | held-out rho | next level's children rho |", "|---|---|---|"]
        for level in sorted({c["level"] for c in summary["surrogate_correlation"]}):
            cells = [c for c in summary["surrogate_correlation"] if c["level"] == level]
            held = [c["held_out"] for c in cells if c["held_out"] is not None]
            chosen = [c["proposed"] for c in cells if c["proposed"] is not None]
            lines.append(f"| {level} | {_fmt(_ms(held), 1, 2)} (n={len(held)}) | {_fmt(_ms(chosen), 1, 2)} (n={len(chosen)}) |")
    prediction = summary.get("latency_prediction")
    if prediction:
        lines += ["", f"Latency predicted from the table vs measured after training, {prediction['networks']} networks: "
                  f"median error {100 * prediction['median_abs_error']:.1f}%, 90th percentile "
                  f"{100 * prediction['p90_abs_error']:.1f}%, worst {100 * prediction['max_abs_error']:.1f}%."]
    ablation = summary.get("indicator_ablation")
    if ablation:
        lines += ["", f"Surrogate features, {ablation['folds']}-fold cross-validated Spearman rho over the "
                  f"{ablation['candidates']} trained space candidates (TE-NAS indicators took "
                  f"{ablation['indicator_seconds']:.1f} s for all):", "", "| features | rho |", "|---|---|"]
        lines += [f"| {name} | {rho:.3f} |" for name, rho in ablation["spearman"].items()]
    if summary["failed"]:
        lines += ["", "Failed units: " + "; ".join(f"{f['unit']}: {f['error']}" for f in summary["failed"])]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    cols = ["strategy", "search_seed", "label", "val_acc", "test_acc", "latency_ms", "predicted_latency_ms",
            "memory_mb", "macs", "parameters", "cpu_seconds", "level"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    return buf.getvalue()


def plot_pareto(summary: dict, path: Path) -> Path:
    """Test accuracy vs measured latency: every trained network, coloured by strategy, and each
    strategy's front over all its seeds; the latency budget as a vertical line."""
    from ..analysis.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in dict.fromkeys(r["strategy"] for r in summary["candidates"]):
        mine = [r for r in summary["candidates"] if r["strategy"] == strategy]
        points = [(r["latency_ms"], 100 * r["test_acc"]) for r in mine]
        dots = ax.scatter(*zip(*points), s=14, alpha=0.5, label=strategy)
        front = [points[i] for i in pareto_front(points)]
        ax.step(*zip(*front), where="post", color=dots.get_facecolor()[0][:3], alpha=0.9)
    if summary["budget"].get("latency_ms"):
        ax.axvline(summary["budget"]["latency_ms"], color="grey", linestyle="--", linewidth=1, label="budget")
    ax.set_xscale("log")
    ax.set_xlabel("measured latency, batch 1, 1 thread (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(summary["name"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_surrogate(correlation: list[dict], path: Path) -> Path:
    from ..analysis.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for seed in sorted({c["search_seed"] for c in correlation}):
        held = [c for c in correlation if c["search_seed"] == seed and c["held_out"] is not None]
        if held:
            ax.plot([c["level"] for c in held], [c["held_out"] for c in held], marker="o", label=f"seed {seed}, held out")
        chosen = [c for c in correlation if c["search_seed"] == seed and c["proposed"] is not None]
        if chosen:
            ax.plot([c["level"] for c in chosen], [c["proposed"] for c in chosen], marker="x", linestyle=":",
                    label=f"seed {seed}, proposed")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("surrogate refit after level (blocks)")
    ax.set_ylabel("Spearman rho, predicted vs trained")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
