"""ReLU-budget experiments: Selective Network Linearization (Cho et al. 2022, ICML).

One run directory per config. The dense network is trained once (``checkpoints/dense.pt``,
per-epoch, resumable). Each entry of ``snl.budgets`` (a share of the network's ReLU
positions per sample) is a separate run from that trained network, in three stages:

1. SNL: every ``nn.ReLU`` becomes a :class:`~secateurs.linearize.MaskedReLU`; weights
   and alphas are trained on ``CE + lambda * ||alpha||_1``. Every ``check_every`` steps the
   ReLUs with alpha above ``threshold`` are counted: lambda grows by ``lasso_growth`` when
   the count has not fallen, and the stage ends as soon as the count is within the budget
   (or after ``snl.epochs``). It is a :class:`~secateurs.train.Trainer` with hooks (the loss,
   an Adam optimizer for the alphas, clamping, the check that stops it), checkpointed per
   epoch (``checkpoints/budget-X-snl.pt``).
2. Binarize: exactly ``round(budget * total)`` ReLUs are kept, those of largest alpha; the
   network with its fixed mask is saved (``checkpoints/budget-X-mask.pt``).
3. Fine-tune the weights with the mask fixed (``finetune``; ``checkpoints/budget-X-finetune.pt``).

Every phase's data order and training RNG come from ``derive_seed(seed, "linearize",
<phase>)`` (``dense``, ``budget-X-snl``, ``budget-X-finetune``). An interrupted run loses at
most one epoch of its current stage, and finished budgets (rows
in ``results.json`` with their fine-tune checkpoint) are never redone. Deviations from the
paper: the fine-tune uses cross-entropy without knowledge distillation, and alphas are kept
in [0, 1] by clamping after each step.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageDataset
from ..errors import CheckpointError, ConfigError, NonFiniteLossError, SparsityMismatchError
from ..linearize import (
    LassoSchedule, alpha_parameters, binarize, clamp_alphas_, lasso_penalty, linearizable, relu_count,
)
from ..seeding import derive_seed
from ..train import Trainer, TrainConfig, build_optimizer, evaluate, load_checkpoint, save_checkpoint
from ..train.config import OptimizerConfig
from ..validate import check_int, check_number
from .config import DataConfig, HashedConfig, ModelConfig, PhaseConfig, load_typed, with_model_defaults
from .runs import RunDir, atomic_write_text, execute
from .sweep import _Data, phase_trainer, build_model
from ..analysis.report import mean_std

__all__ = [
    "SNLSettings", "LinearizeConfig", "load_linearize_config", "run_linearize", "format_linearize",
    "aggregate", "format_aggregate",
]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SNLSettings:
    """The ReLU budgets and SNL's search: lambda starts at ``lasso`` and is multiplied by
    ``lasso_growth`` at a check (every ``check_every`` steps) where the count of alphas above
    ``threshold`` fell by less than ``min_decrease`` (relative). ``optimizer`` trains the
    weights during the search; the alphas use Adam at ``alpha_lr`` without weight decay."""

    budgets: tuple[float, ...] = (0.5,)
    lasso: float = 1e-4
    lasso_growth: float = 1.2
    min_decrease: float = 0.0
    threshold: float = 1e-2
    epochs: int = 3  # at most; the search stops as soon as the budget is met
    check_every: int = 10
    alpha_lr: float = 1e-2
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=0.01))

    def __post_init__(self) -> None:
        for b in self.budgets:
            if not _number(b) or not 0.0 < b < 1.0:
                raise ConfigError(
                    f"snl.budgets entries are shares of the ReLUs to keep, in (0, 1); got {b!r} "
                    "(the dense network is always reported as the 100% row)"
                )
        if not self.budgets or len({_phase(b) for b in self.budgets}) != len(self.budgets):
            raise ConfigError(f"snl.budgets {list(self.budgets)} must be non-empty without repeats")
        for name in ("epochs", "check_every"):
            value = getattr(self, name)
            check_int(value, f"snl.{name}", minimum=1)
        for name in ("lasso", "alpha_lr"):
            check_number(getattr(self, name), f"snl.{name}", above=0, finite=True)
        if not _number(self.lasso_growth) or self.lasso_growth < 1:
            raise ConfigError(f"snl.lasso_growth must be >= 1 (1 keeps lambda fixed), got {self.lasso_growth!r}")
        if not _number(self.min_decrease) or not 0 <= self.min_decrease < 1:
            raise ConfigError(f"snl.min_decrease must be in [0, 1), got {self.min_decrease!r}")
        if not _number(self.threshold) or not 0 <= self.threshold < 1:
            raise ConfigError(f"snl.threshold must be in [0, 1) (SNL uses 0.01), got {self.threshold!r}")


@dataclass(frozen=True)
class LinearizeConfig(HashedConfig):
    """A whole ReLU-linearization experiment (``secateurs linearize``)."""

    name: str = "linearize"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: PhaseConfig = field(default_factory=PhaseConfig)
    snl: SNLSettings = field(default_factory=SNLSettings)
    finetune: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=2))


def load_linearize_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> LinearizeConfig:
    return load_typed(LinearizeConfig, path, overrides, "linearize config",
                      prepare=partial(with_model_defaults, kind=LinearizeConfig))


def _phase(budget: float) -> str:
    return f"budget-{budget:g}"


def run_linearize(
    config: LinearizeConfig,
    run: RunDir,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    dataset: ImageDataset | None = None,
) -> dict:
    """Run (or resume, or re-read) the experiment in ``run``; returns its results."""
    return execute(run, config, lambda data: _Linearize(config, run, data, progress, echo).run(), echo=echo, dataset=dataset)


class _Linearize:
    def __init__(self, config: LinearizeConfig, run: RunDir, dataset: ImageDataset, progress: bool, echo):
        self.config, self.run_dir, self.progress, self.echo = config, run, progress, echo
        self.s = config.snl
        self.data = _Data(config, dataset)
        self.dataset = self.data.dataset

    def _trainer(self, model: nn.Module, name: str, phase: PhaseConfig, desc: str) -> Trainer:
        """Seeded by ``derive_seed(seed, "linearize", name)``, as the search is."""
        return phase_trainer(self.data, self.run_dir, self.config, model, name, phase, None, desc, self.progress,
                             procedure="linearize")

    def _linearized_dense(self) -> nn.Module:
        """The trained dense network with every ReLU masked (all alphas 1: the same function)."""
        model = build_model(self.config, self.dataset).to(self.data.device)
        model.load_state_dict(load_checkpoint(self.run_dir.checkpoint("dense"))["model"])
        linearizable(model, self.data.example())
        return model

    # -- dense ----------------------------------------------------------------------------------
    def dense(self) -> dict:
        model = build_model(self.config, self.dataset)
        trainer = self._trainer(model, "dense", self.config.train, "dense")
        if trainer.resume():
            self.echo(f"resumed dense training at epoch {trainer.state.epoch}/{self.config.train.epochs}")
        history = trainer.fit()
        save_checkpoint(self.run_dir.checkpoint("dense"), trainer.state_dict())
        final = trainer.evaluate(self.data.test)
        positions = linearizable(model, self.data.example())
        return {"test_acc": final["acc"], "test_loss": final["loss"], "epochs": len(history),
                "relus": sum(positions.values()), "layers": positions}

    # -- SNL search -----------------------------------------------------------------------------
    def search(self, model: nn.Module, budget: int, phase: str, desc: str) -> dict:
        """Train weights and alphas on CE + lambda * ||alpha||_1 until at most ``budget``
        alphas exceed the threshold: a Trainer whose hooks are SNL (the loss, Adam for the
        alphas, clamping, the check that grows lambda and stops the search); resumable per epoch."""
        s, name = self.s, f"{phase}-snl"
        path = self.run_dir.checkpoint(name)
        alphas = alpha_parameters(model)
        ids = {id(a) for a in alphas}
        schedule = LassoSchedule(budget, s.lasso, s.lasso_growth, s.min_decrease)
        cfg = TrainConfig(epochs=s.epochs, optimizer=s.optimizer, seed=derive_seed(self.config.seed, "linearize", name),
                          device=self.config.device, health="off")  # the loss includes the penalty: no chance level
        ce: dict[str, torch.Tensor] = {}  # the last step's cross-entropy, read back only at checks

        def loss_fn(m: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(logits, y)
            ce["last"] = loss.detach()
            return loss + schedule.lasso * lasso_penalty(m)

        def check(trainer: Trainer) -> None:
            step = trainer.state.step
            if step % s.check_every:
                return
            alive = relu_count(model, s.threshold)[0]
            done = schedule.update(alive)
            self.run_dir.log({"phase": name, "epoch": step / trainer.steps_per_epoch, "step": step, "alive": alive,
                              "budget": budget, "lasso": schedule.lasso, "train_ce": float(ce["last"])})
            if done:
                trainer.stop()

        trainer = Trainer(
            model, self.data.train(cfg.seed), cfg, checkpoint_path=path, progress=self.progress, progress_desc=desc,
            optimizer=build_optimizer([p for p in model.parameters() if id(p) not in ids], s.optimizer),
            loss_fn=loss_fn, extra_optimizers=[torch.optim.Adam(alphas, lr=s.alpha_lr)],
            after_step=[lambda t: clamp_alphas_(t.model)], step_callbacks=[check], extra_state={"lasso": schedule},
        )
        try:
            resumed = trainer.resume()
        except CheckpointError:
            if "search" in load_checkpoint(path):  # the layout of the hand-written loop before this one
                raise CheckpointError(
                    f"{path} is an SNL search checkpoint written by an older secateurs; delete it to redo "
                    f"{name} from the trained dense network (the rest of the run is kept)"
                ) from None
            raise
        if resumed and not trainer.stopped and trainer.state.epoch < s.epochs:
            self.echo(f"resumed {name} at epoch {trainer.state.epoch}/{s.epochs}")
        try:
            trainer.fit()
        except NonFiniteLossError as e:
            raise NonFiniteLossError(
                f"{name}: {e} In the SNL search that learning rate is snl.optimizer.lr ({s.optimizer.lr}) and there is "
                f"no grad_clip; the alphas follow snl.alpha_lr ({s.alpha_lr}) and snl.lasso ({s.lasso}). Lower them "
                "and run again (a changed config is a new run directory)"
            ) from None
        alive = relu_count(model, s.threshold)[0]
        if alive > budget:
            self.echo(f"{name}: {alive} ReLUs still above snl.threshold after {s.epochs} epochs (budget {budget}); "
                      "binarizing anyway. Raise snl.lasso, snl.lasso_growth or snl.epochs to finish the search")
        return {"epochs": trainer.state.epoch, "steps": trainer.state.step, "reached_budget": alive <= budget,
                "alive_at_end": alive, "lasso_final": schedule.lasso}

    # -- one budget -----------------------------------------------------------------------------
    def level(self, index: int, fraction: float, dense: dict) -> dict:
        phase, total = _phase(fraction), dense["relus"]
        budget = round(fraction * total)
        desc = f"{phase} ({index}/{len(self.s.budgets)})"
        model = self._linearized_dense()
        mask_path = self.run_dir.checkpoint(f"{phase}-mask")
        if mask_path.is_file():
            saved = load_checkpoint(mask_path)
            model.load_state_dict(saved["model"])  # hard mode and the mask come with the state
            record = saved["record"]
        else:
            record = self.search(model, budget, phase, f"{desc} snl")
            record["acc_soft"] = evaluate(model, self.data.test)["acc"]
            binarize(model, budget)
        trainer = self._trainer(model, f"{phase}-finetune", self.config.finetune, f"{desc} fine-tune")
        if "acc_before_finetune" not in record:
            before = trainer.evaluate(self.data.test)
            record.update(acc_before_finetune=before["acc"], loss_before_finetune=before["loss"])
            save_checkpoint(mask_path, {"model": model.state_dict(), "record": record})
        if trainer.resume():
            self.echo(f"resumed {phase}-finetune at epoch {trainer.state.epoch}/{self.config.finetune.epochs}")
        history = trainer.fit()
        save_checkpoint(self.run_dir.checkpoint(f"{phase}-finetune"), trainer.state_dict())
        kept, layers = relu_count(model)
        if kept != budget:
            raise SparsityMismatchError(f"{phase}: the fine-tuned network keeps {kept} ReLUs, not the budget {budget}")
        final = trainer.evaluate(self.data.test)
        return {
            "phase": phase, "budget_fraction": fraction, "relus_kept": kept, "relus_total": total,
            "layers": layers, "snl": {k: record[k] for k in ("epochs", "steps", "reached_budget", "alive_at_end", "lasso_final")},
            "acc_soft": record["acc_soft"], "acc_before_finetune": record["acc_before_finetune"],
            "test_acc": final["acc"], "test_loss": final["loss"], "finetune_epochs": len(history),
            "drop_before_finetune_pt": 100.0 * (dense["test_acc"] - record["acc_before_finetune"]),
            "drop_pt": 100.0 * (dense["test_acc"] - final["acc"]),
        }

    # -- the whole run --------------------------------------------------------------------------
    def run(self) -> dict:
        config, run = self.config, self.run_dir
        results = run.results()
        results.update(config_hash=config.short_hash(), name=config.name, model=config.model.name,
                       dataset=self.dataset.name, seed=config.seed)
        rows: dict[str, dict] = {r["phase"]: r for r in results.get("levels", [])}
        if not (results.get("dense") and run.checkpoint("dense").is_file()):
            results["dense"] = self.dense()
            self._save(results, rows, complete=False)
        for index, fraction in enumerate(self.s.budgets, start=1):
            phase = _phase(fraction)
            if phase in rows and run.checkpoint(f"{phase}-finetune").is_file():
                continue
            rows[phase] = self.level(index, fraction, results["dense"])
            self._save(results, rows, complete=False)
        self._save(results, rows, complete=True)
        return run.results()

    def _save(self, results: dict, rows: dict[str, dict], complete: bool) -> None:
        order = {_phase(b): i for i, b in enumerate(self.s.budgets)}
        levels = sorted((r for r in rows.values() if r["phase"] in order), key=lambda r: order[r["phase"]])
        out = {**results, "complete": complete, "levels": levels}
        self.run_dir.write_results(out)
        atomic_write_text(self.run_dir.path / "linearize.md", format_linearize(out))


# -- report ---------------------------------------------------------------------------------------
def _layers(kept: Mapping[str, float], total: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {kept[name]:g}/{total[name]}" for name in total)


def format_linearize(results: dict) -> str:
    """Markdown: the dense network (100% of the ReLUs), then one row per budget."""
    dense = results.get("dense") or {}
    lines = [
        f"{results.get('model', '')} on {results.get('dataset', '')}, seed {results.get('seed')}: "
        "selective network linearization (Cho et al. 2022)"
        + ("" if results.get("complete") else " — INCOMPLETE (re-run the same command to resume)"),
        "", "| ReLU budget | ReLUs kept | acc. binarized, before FT (%) | acc. after FT (%) | drop (pt) | "
        "SNL steps | ReLUs kept per layer |", "|---|---|---|---|---|---|---|",
    ]
    if dense:
        lines.append(f"| 100% (dense) | {dense['relus']}/{dense['relus']} | - | {100 * dense['test_acc']:.2f} | - | - | "
                     f"{_layers(dense['layers'], dense['layers'])} |")
    for row in results.get("levels", []):
        missed = "" if row["snl"]["reached_budget"] else " (budget not reached)"
        lines.append(
            f"| {100 * row['budget_fraction']:g}% | {row['relus_kept']}/{row['relus_total']} | "
            f"{100 * row['acc_before_finetune']:.2f} | {100 * row['test_acc']:.2f} | {row['drop_pt']:+.2f} | "
            f"{row['snl']['steps']}{missed} | {_layers(row['layers'], dense.get('layers', {}))} |"
        )
    lines += ["", "ReLUs per sample; drop = dense accuracy - accuracy after fine-tuning (pt). Each budget is "
              "searched from the trained dense network, binarized to exactly the budget, then fine-tuned."]
    return "\n".join(lines) + "\n"


def aggregate(results: Sequence[dict]) -> dict:
    """Mean and sample std over seeds (one finished results dict per seed) of the dense
    accuracy and, per budget, the accuracies and the drop; kept ReLUs per layer as means."""
    if not results:
        raise ConfigError("aggregate needs at least one results dict (one per seed)")
    unfinished = [r.get("seed") for r in results if not r.get("complete")]
    if unfinished:
        raise ConfigError(f"runs of seeds {unfinished} are not complete; re-run them to finish before aggregating")
    shape = {(r["model"], r["dataset"], tuple(x["phase"] for x in r["levels"])) for r in results}
    if len(shape) != 1:
        raise ConfigError("aggregate takes runs of one model, dataset and list of budgets; group the runs first")
    first = results[0]
    levels = []
    for i, row in enumerate(first["levels"]):
        rows = [r["levels"][i] for r in results]
        levels.append({
            "phase": row["phase"], "budget_fraction": row["budget_fraction"], "relus_kept": row["relus_kept"],
            "relus_total": row["relus_total"],
            **{k: mean_std([x[k] for x in rows]) for k in ("acc_soft", "acc_before_finetune", "test_acc", "drop_pt")},
            "layers": {n: statistics.fmean(x["layers"][n] for x in rows) for n in row["layers"]},
            "reached_budget": sum(x["snl"]["reached_budget"] for x in rows),
            "snl_steps": mean_std([x["snl"]["steps"] for x in rows]),
        })
    return {"model": first["model"], "dataset": first["dataset"], "seeds": [r["seed"] for r in results],
            "dense": {"relus": first["dense"]["relus"], "layers": first["dense"]["layers"],
                      "test_acc": mean_std([r["dense"]["test_acc"] for r in results])},
            "levels": levels}


def _pm(stat: dict, scale: float = 100.0) -> str:
    return f"{scale * stat['mean']:.2f} ± {scale * stat['std']:.2f}"


def format_aggregate(summary: dict) -> str:
    """Markdown: mean ± sample std over seeds per budget."""
    dense, n = summary["dense"], len(summary["seeds"])
    lines = [
        f"{summary['model']} on {summary['dataset']}: selective network linearization, mean ± std over {n} seeds "
        f"({', '.join(map(str, summary['seeds']))})", "",
        "| ReLU budget | ReLUs kept | acc. binarized, before FT (%) | acc. after FT (%) | drop (pt) | "
        "budget reached by search | mean ReLUs kept per layer |", "|---|---|---|---|---|---|---|",
        f"| 100% (dense) | {dense['relus']}/{dense['relus']} | - | {_pm(dense['test_acc'])} | - | - | "
        f"{_layers(dense['layers'], dense['layers'])} |",
    ]
    for row in summary["levels"]:
        layers = {k: round(v, 1) for k, v in row["layers"].items()}
        lines.append(
            f"| {100 * row['budget_fraction']:g}% | {row['relus_kept']}/{row['relus_total']} | "
            f"{_pm(row['acc_before_finetune'])} | {_pm(row['test_acc'])} | {_pm(row['drop_pt'], 1.0)} | "
            f"{row['reached_budget']}/{n} | {_layers(layers, dense['layers'])} |"
        )
    return "\n".join(lines) + "\n"
