"""Do training-free indicators predict trained accuracy? (``secateurs indicators``)

Measures TE-NAS's two indicators at initialisation (Chen, Gong & Wang 2021; see
:mod:`secateurs.analysis.indicators`) for every candidate architecture of the config, trains
each candidate briefly, and reports Kendall's tau between test accuracy and each indicator:
``-ln(condition number)`` (trainability), the linear-region count (expressivity), the
negated TE-NAS rank sum, and the parameter count as a naive baseline. A positive tau means
the indicator orders the architectures as their accuracy does.

Candidates are MLPs or small conv stacks (conv3x3-ReLU-maxpool per entry of ``channels``,
then a ReLU MLP head), candidates of the architecture search space built by its one builder
(:func:`secateurs.search.space.build`, no batch norm), all with ``nn.ReLU``
modules so their activation patterns can be counted. Every (architecture, training seed) is
one checkpointed training phase (``checkpoints/<label>-seed-<s>.pt``) and each finished
architecture's row goes to ``results.json`` at once, so an interrupted run resumes within the
unfinished architecture and never retrains a finished one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ..analysis.indicators import indicators, rank_architectures
from ..data import ImageDataset
from ..errors import ConfigError
from ..models import count_parameters
from ..models._common import glorot_init
from ..search.space import Architecture as SpaceArchitecture, Block, InputShape, build
from ..train import Trainer
from .config import DataConfig, HashedConfig, PhaseConfig, load_typed
from .runs import RunDir, atomic_write_text, execute
from .sweep import _Data, _train_config

__all__ = [
    "Architecture", "IndicatorSettings", "IndicatorsConfig", "load_indicators_config", "build_candidate",
    "run_indicators", "kendall_taus", "plot_indicators", "format_indicators", "TAU_INDICATORS",
]

KINDS = ("mlp", "cnn")
#: result key -> how it is correlated with accuracy (sign chosen so that positive tau = agrees)
TAU_INDICATORS: dict[str, str] = {
    "trainability": "-ln(NTK condition number)",
    "expressivity": "linear regions",
    "tenas": "-(TE-NAS rank sum)",
    "parameters": "parameter count (baseline)",
}


def _widths(values, what: str) -> None:
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in values):
        raise ConfigError(f"{what} must be positive integer widths, got {list(values)}")


@dataclass(frozen=True)
class Architecture:
    """One candidate: ``kind: mlp`` with ``hidden`` widths, or ``kind: cnn`` with conv
    ``channels`` (each conv3x3 + ReLU + 2x2 max-pool) followed by ``hidden`` FC widths."""

    kind: str = "mlp"
    hidden: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown architecture kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        _widths(self.hidden, f"{self.label} hidden")
        _widths(self.channels, f"{self.label} channels")
        if self.kind == "mlp" and (self.channels or not self.hidden):
            raise ConfigError(
                f"an mlp candidate takes hidden widths only (at least one: without a hidden layer it has "
                f"no ReLU and no linear regions), got hidden={list(self.hidden)} channels={list(self.channels)}"
            )
        if self.kind == "cnn" and not self.channels:
            raise ConfigError("a cnn candidate needs conv channels, e.g. {kind: cnn, channels: [16, 32], hidden: [64]}")

    def to_space(self) -> SpaceArchitecture:
        """This candidate in the shared search space: 3x3 conv blocks that each pool, then fc blocks."""
        return SpaceArchitecture(tuple(Block("conv3", w, pool=True) for w in self.channels)
                                 + tuple(Block("fc", h) for h in self.hidden))

    @property
    def label(self) -> str:
        """A readable unique name, also the checkpoint name: ``mlp-64-32``, ``cnn-16-32-fc-64``."""
        parts = [self.kind, *map(str, self.channels)]
        if self.kind == "cnn" and self.hidden:
            parts.append("fc")
        return "-".join(parts + [str(h) for h in self.hidden])


@dataclass(frozen=True)
class IndicatorSettings:
    """How the indicators are measured: NTK on the first ``ntk_batch`` training images,
    regions on the first ``region_samples``, each averaged over ``repeats`` initialisations."""

    ntk_batch: int = 64
    region_samples: int = 1000
    repeats: int = 3
    train_mode: bool = True  # TE-NAS measures in train mode (batch statistics for batch norm)

    def __post_init__(self) -> None:
        for name, low in (("ntk_batch", 2), ("region_samples", 1), ("repeats", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"indicators.{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class IndicatorsConfig(HashedConfig):
    """A whole indicators-vs-accuracy study. ``seed`` draws the indicator initialisations;
    each of ``train_seeds`` trains every candidate once (its init and batch order), and the
    reported accuracy is their mean."""

    name: str = "indicators"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    architectures: tuple[Architecture, ...] = ()
    indicators: IndicatorSettings = field(default_factory=IndicatorSettings)
    train: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=1))
    train_seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        labels = [a.label for a in self.architectures]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ConfigError(f"architectures {repeated} are listed more than once; each candidate once")
        if not self.train_seeds or len(set(self.train_seeds)) != len(self.train_seeds):
            raise ConfigError(f"train_seeds must list distinct seeds (at least one), got {list(self.train_seeds)}")


def load_indicators_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> IndicatorsConfig:
    return load_typed(IndicatorsConfig, path, overrides, "indicators config")


def build_candidate(arch: Architecture, *, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The network ``arch`` describes, built by the search space's one builder
    (:func:`secateurs.search.space.build`, without batch norm) and Glorot-initialised like the
    zoo's MLP and Conv nets."""
    if arch.kind == "cnn" and image_size % 2 ** len(arch.channels):
        raise ConfigError(
            f"{arch.label} halves the {image_size}px image {len(arch.channels)} times; "
            f"use at most {int(math.log2(image_size & -image_size))} conv entries for this dataset"
        )
    model = build(arch.to_space(), InputShape(in_channels, image_size, num_classes), batchnorm=False)
    glorot_init(model)
    return model


def run_indicators(
    config: IndicatorsConfig,
    run: RunDir,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    dataset: ImageDataset | None = None,
) -> dict:
    """Run (or resume, or re-read) the study in ``run``; returns its results."""
    if len(config.architectures) < 2:
        raise ConfigError(f"list at least 2 architectures to rank (got {len(config.architectures)}); "
                          "see configs/indicators_mnist.yaml")
    return execute(run, config, lambda data: _Study(config, run, data, progress, echo).run(), echo=echo, dataset=dataset)


class _Study:
    def __init__(self, config: IndicatorsConfig, run: RunDir, dataset: ImageDataset, progress: bool, echo):
        self.config, self.run_dir, self.progress, self.echo = config, run, progress, echo
        self.data = _Data(config, dataset)
        self.dataset = self.data.dataset
        s = config.indicators
        n = max(s.ntk_batch, s.region_samples)
        if n > len(self.dataset.train_images):
            raise ConfigError(f"indicators need {n} training images, {self.dataset.name} has "
                              f"{len(self.dataset.train_images)}; lower indicators.ntk_batch / region_samples")
        # the first training images, normalised like the training batches: the same for every candidate
        images = self.data.transform(self.dataset.train_images[:n]).to(self.data.device)
        self.ntk_inputs, self.region_inputs = images[: s.ntk_batch], images[: s.region_samples]

    def factory(self, arch: Architecture) -> Callable[[], nn.Module]:
        ds = self.dataset
        return lambda: build_candidate(arch, in_channels=ds.in_channels, image_size=ds.image_size[0],
                                       num_classes=ds.num_classes)

    def train(self, arch: Architecture, seed: int, desc: str) -> dict:
        phase = f"{arch.label}-seed-{seed}"
        torch.manual_seed(seed)
        model = self.factory(arch)()
        # unless the config says otherwise, an architecture that cannot learn is a data point here, not a failure
        cfg = _train_config(self.config.train, self.config, seed, health="mark")
        log = lambda record: self.run_dir.log({"phase": phase, **record})  # noqa: E731
        trainer = Trainer(model, self.data.train(seed), cfg, eval_data=self.data.test, val_data=self.data.val,
                          checkpoint_path=self.run_dir.checkpoint(phase), callbacks=[log],
                          progress=self.progress, progress_desc=desc)
        if trainer.resume():
            self.echo(f"resumed {phase} at epoch {trainer.state.epoch}/{cfg.epochs}")
        trainer.fit()
        final = trainer.evaluate(self.data.test)
        return {"seed": seed, "test_acc": final["acc"], "test_loss": final["loss"], "health": trainer.health}

    def architecture(self, index: int, arch: Architecture) -> dict:
        config, s = self.config, self.config.indicators
        measured = indicators(self.factory(arch), self.ntk_inputs, self.region_inputs, seed=config.seed,
                              repeats=s.repeats, train_mode=s.train_mode)
        runs = [self.train(arch, seed, f"{arch.label} ({index}/{len(config.architectures)})")
                for seed in config.train_seeds]
        accs = [r["test_acc"] for r in runs]
        mean = sum(accs) / len(accs)
        row = {
            "label": arch.label, "kind": arch.kind, "hidden": list(arch.hidden), "channels": list(arch.channels),
            "parameters": count_parameters(self.factory(arch)()), **measured,
            "test_acc": mean, "test_acc_std": math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs)),
            "runs": runs,
        }
        self.echo(f"[{index}/{len(config.architectures)}] {arch.label}: ln kappa {row['log_condition_number']:.2f}, "
                  f"regions {row['regions']:.0f}/{row['region_samples']}, test acc {100 * mean:.2f}%")
        return row

    def run(self) -> dict:
        config, run = self.config, self.run_dir
        results = run.results()
        results.update(config_hash=config.short_hash(), name=config.name, dataset=self.dataset.name,
                       seed=config.seed, train_seeds=list(config.train_seeds), epochs=config.train.epochs,
                       **{k: getattr(config.indicators, k) for k in ("ntk_batch", "region_samples", "repeats")})
        rows = {r["label"]: r for r in results.get("architectures", [])}
        for index, arch in enumerate(config.architectures, start=1):
            done = [run.checkpoint(f"{arch.label}-seed-{s}").is_file() for s in config.train_seeds]
            if arch.label in rows and all(done):
                continue
            rows[arch.label] = self.architecture(index, arch)
            self._save(results, rows, complete=False)
        ranked = rank_architectures([rows[a.label] for a in config.architectures])
        results["tau"] = kendall_taus(ranked)
        results["plot"] = plot_indicators(ranked, results["tau"], run.path / "indicators.png").name
        self._save(results, {r["label"]: r for r in ranked}, complete=True)
        return run.results()

    def _save(self, results: dict, rows: dict[str, dict], complete: bool) -> None:
        ordered = [rows[a.label] for a in self.config.architectures if a.label in rows]
        out = {**results, "complete": complete, "architectures": ordered}
        self.run_dir.write_results(out)
        atomic_write_text(self.run_dir.path / "indicators.md", format_indicators(out))


def _indicator_values(rows: list[dict]) -> dict[str, list[float]]:
    """Each indicator signed so that larger should mean more accurate."""
    return {
        "trainability": [-r["log_condition_number"] for r in rows],
        "expressivity": [float(r["regions"]) for r in rows],
        "tenas": [-r["tenas_rank"] for r in rows],
        "parameters": [float(r["parameters"]) for r in rows],
    }


def kendall_taus(rows: list[dict]) -> dict[str, dict]:
    """Kendall's tau-b (ties allowed) and its two-sided p-value between test accuracy and each
    indicator of ranked rows; NaN (a constant indicator) is stored as None."""
    from scipy.stats import kendalltau

    acc = [r["test_acc"] for r in rows]
    out = {}
    for key, values in _indicator_values(rows).items():
        finite = [(a, v) for a, v in zip(acc, values) if not math.isnan(v)]
        tau, p = kendalltau([a for a, _ in finite], [v for _, v in finite]) if len(finite) > 1 else (math.nan, math.nan)
        out[key] = {"indicator": TAU_INDICATORS[key], "tau": None if math.isnan(tau) else float(tau),
                    "p_value": None if math.isnan(p) else float(p), "n": len(finite)}
    return out


def plot_indicators(rows: list[dict], taus: dict, path: Path) -> Path:
    """Accuracy against each indicator, one panel each, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    values = _indicator_values(rows)
    acc = [100 * r["test_acc"] for r in rows]
    fig, axes = plt.subplots(1, len(values), figsize=(4 * len(values), 3.6), sharey=True)
    for ax, (key, xs) in zip(axes, values.items()):
        for kind, marker in (("mlp", "o"), ("cnn", "s")):
            pts = [(x, a) for x, a, r in zip(xs, acc, rows) if r["kind"] == kind and math.isfinite(x)]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=kind, alpha=0.8)
        tau = taus[key]["tau"]
        ax.set_title(f"tau = {tau:.2f}" if tau is not None else "tau undefined", fontsize=10)
        ax.set_xlabel(TAU_INDICATORS[key])
        if key == "parameters":
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def format_indicators(results: dict) -> str:
    """Markdown: one row per architecture (most accurate first), then the taus; "!" marks an
    architecture one of whose training seeds learned nothing (listed under the table)."""
    rows = sorted(results.get("architectures", []), key=lambda r: -r["test_acc"])
    seeds = results.get("train_seeds") or [0]
    lines = [
        f"TE-NAS indicators vs. accuracy on {results.get('dataset', '')}: {len(rows)} architectures; indicators are "
        f"means over {results.get('repeats')} initialisations (NTK on {results.get('ntk_batch')} images, regions on "
        f"{results.get('region_samples')}); accuracy is the mean of {len(seeds)} training seed(s) after "
        f"{results.get('epochs')} epoch(s)" + ("" if results.get("complete") else " — INCOMPLETE (re-run the same command to resume)"),
        "", "| architecture | params | ln κ | regions | TE-NAS rank sum | test acc (%) |", "|---|---|---|---|---|---|",
    ]
    for r in rows:
        rank = f"{r['tenas_rank']:g}" if "tenas_rank" in r else "-"
        std = f" ± {100 * r['test_acc_std']:.2f}" if len(r.get("runs", [])) > 1 else ""
        failed = "!" if any(run.get("health") for run in r.get("runs", [])) else ""
        lines.append(f"| {r['label']} | {r['parameters']:,} | {r['log_condition_number']:.2f} | {r['regions']:.1f} | "
                     f"{rank} | {100 * r['test_acc']:.2f}{std}{failed} |")
    failures = [(r["label"], run) for r in rows for run in r.get("runs", []) if run.get("health")]
    if failures:
        lines.append("")
        lines += [f"! {label}, seed {run['seed']} learned nothing: {run['health']}" for label, run in failures]
    if results.get("tau"):
        lines += ["", "| indicator | Kendall tau | p-value |", "|---|---|---|"]
        for t in results["tau"].values():
            tau = "undefined" if t["tau"] is None else f"{t['tau']:+.3f}"
            p = "-" if t["p_value"] is None else f"{t['p_value']:.2g}"
            lines.append(f"| {t['indicator']} | {tau} | {p} |")
        lines += ["", "Positive tau: the indicator orders the architectures as their test accuracy does. "
                  "ln κ = inf: the NTK is singular on the batch (e.g. a sample that switches off a whole layer)."]
    return "\n".join(lines) + "\n"
