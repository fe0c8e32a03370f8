"""Lottery-ticket experiments: IMP and COLT rounds with controls, resumable per round.

One run directory per (config, seed). Round 0 trains the dense network; round r >= 1 starts
from ``checkpoints/round-RR-start.pt`` -- the masks after pruning round r-1's trained
network and the weights after the reset -- written once, atomically, and then shared by the
ticket's training and by every control (the same mask with another initialisation of the
kept weights, e.g. ``reinit``: the control of Frankle & Carbin 2019). Every training
checkpoints each epoch; a finished round is ``rounds/round-RR.json``. So a run killed
anywhere resumes where it stopped: no round is repeated and at most one epoch is lost, and
re-running a finished config only re-reads it.

Procedures:

- ``imp`` (Frankle & Carbin 2019): the trained ticket is pruned by the criterion at the
  per-layer (or global) rate, then reset: ``rewind`` (weights to iteration k, retrain the
  remaining T - k steps; Frankle et al. 2020), ``lr_rewind`` (keep the weights, replay the
  learning-rate schedule from step k; Renda et al. 2020), ``finetune`` (keep the weights,
  train ``retrain_epochs`` at the schedule's final learning rate) or ``linear_decay`` (keep
  the weights, learning rate decayed linearly to 0 over ``retrain_epochs``; Zimmer et al.
  2023, without their warm-up), or one of the retraining schedules compared by Zimmer,
  Spiegel & Pokutta (ICLR 2023, "How I Learned to Stop Worrying and Love Retraining"):
  ``slr``, ``clr``, ``llr`` and ``allr`` (see :func:`retraining_schedule` for the formulas).
  ``lottery.budget`` makes it budgeted IMP (BIMP, same paper): a total number of epochs,
  the dense phase included, split across the rounds by :func:`bimp_epochs`.
- ``colt`` (Hossain et al. 2023, "cyclic overlapping lottery tickets"): in every round one
  copy of the ticket is trained on each segment of the training data (disjoint class groups
  or random parts), each copy is pruned at the rate and the next mask keeps only the weights
  every copy kept (the overlap); the round's ticket itself is trained on all the data to
  measure it.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ..allocation import check_sparsity
from ..analysis.mask_metrics import learning_distance, mask_iou
from ..criteria import CRITERIA
from ..data import ImageDataset
from ..errors import CheckpointError, ConfigError, UnknownNameError
from ..methods.lottery import LotteryTicket, criterion_masks, half_rate_output_sparsity
from ..resets import KEPT_INITS, init_kept_, rewind_
from ..schedules import parse_duration
from ..seeding import derive_seed
from ..validate import check_int
from ..vocabulary import IMP_SCOPES, LOTTERY_RESETS, SCOPES
from ..train import Trainer, TrainConfig, build_optimizer, load_checkpoint, save_checkpoint
from ..train.optim import build_lr_schedule
from .config import (DataConfig, HashedConfig, ModelConfig, PhaseConfig, aggregate_dir, load_typed, read_yaml,
                     with_model_defaults)
from .runs import RunDir, atomic_write_text, execute
from .sweep import _Data, build_model
from ..analysis.report import mean_std

PROCEDURES = ("imp", "colt")
SPLITS = ("classes", "random")
#: resets that keep the trained weights and retrain for a number of epochs with their own schedule
RETRAIN_RESETS = ("finetune", "linear_decay", "llr", "slr", "clr", "allr")
#: the share of a retraining spent warming up in SLR, CLR, LLR and ALLR (Zimmer et al. 2023: 10 %)
WARMUP_SHARE = 0.1


def bimp_epochs(budget: int, dense_epochs: int, rounds: int) -> list[int]:
    """Budgeted IMP's epochs per round (Zimmer, Spiegel & Pokutta, ICLR 2023): of a total
    ``budget`` of epochs, the dense phase (round 0) trains ``dense_epochs``; the remaining
    ``R = budget - dense_epochs`` are split evenly across the ``rounds`` prune-retrain cycles,
    ``floor(R / rounds)`` each, and the last round also takes the remainder
    ``R - rounds * floor(R / rounds)`` (as the authors' code, ZIB-IOL/BIMP, splits
    ``n_epochs_to_split``). Returns ``[dense_epochs, e_1, ..., e_rounds]``, summing to ``budget``.
    Every round needs at least one epoch, so ``budget >= dense_epochs + rounds``."""
    check_int(budget, "lottery.budget", minimum=1, hint="total epochs of BIMP, the dense phase included")
    check_int(rounds, "lottery.rounds", minimum=1, hint="BIMP splits its budget across at least one pruning round")
    left = budget - dense_epochs
    if left < rounds:
        raise ConfigError(
            f"lottery.budget={budget} epochs cannot fit {rounds} pruning round(s) after the {dense_epochs}-epoch dense "
            f"phase (train.epochs): that leaves {left} epoch(s), and each round retrains at least 1. Raise "
            f"lottery.budget to at least {dense_epochs + rounds}, shorten train.epochs or use fewer lottery.rounds"
        )
    each = left // rounds
    return [dense_epochs] + [each] * (rounds - 1) + [left - each * (rounds - 1)]


def allr_lr(max_lr: float, norm_drop: float, pruned_share: float, retrain_epochs: int, dense_epochs: int) -> float:
    """ALLR's initial (after warm-up) learning rate (Zimmer, Spiegel & Pokutta, ICLR 2023):

    ``eta = clip(max_lr * d / sqrt(s), min(retrain_epochs / dense_epochs, 1) * max_lr, max_lr)``

    with ``d = ||theta - theta_pruned|| / ||theta||`` the relative L2 norm of the weights the
    round removed (over all parameters), and ``s`` the share of the remaining prunable weights
    the round removed. Were the removed weights as large as the kept ones, ``d = sqrt(s)`` and
    ALLR starts at ``max_lr`` (LLR); magnitude pruning removes small weights, so ``d < sqrt(s)``
    and the restart is gentler, but never below the budget's share of ``max_lr``."""
    scale = norm_drop / math.sqrt(pruned_share) if pruned_share > 0 else 0.0
    floor = min(retrain_epochs / dense_epochs, 1.0) * max_lr if dense_epochs > 0 else max_lr
    return min(max(scale * max_lr, floor), max_lr)


def retraining_schedule(reset: str, dense_lrs: Sequence[float], dense_warmup_steps: int, epochs: int,
                        steps_per_epoch: int, lr: float | None = None) -> tuple[float, dict, Callable[[int], float] | None]:
    """The learning rate of a retraining of ``epochs`` epochs after pruning, as
    ``(peak_lr, lr_schedule, factor)``: the optimizer's learning rate, the library schedule
    (:data:`~secateurs.train.optim.LR_SCHEDULES`) that multiplies it, and for SLR a per-step
    factor that replaces that schedule. ``dense_lrs`` are the dense phase's learning rates per
    step (``T`` steps), ``max_lr`` their maximum and ``min_lr`` their minimum after the dense
    warm-up. With ``N = epochs * steps_per_epoch`` steps, a warm-up of
    ``W = round(0.1 * N)`` steps (the library's linear ramp ``(t + 1) / W``; the authors' code
    ramps along a half cosine from 0) and ``R = N - W``, Zimmer, Spiegel & Pokutta (ICLR 2023)
    define, at step ``t >= W`` with ``j = t - W``:

    - ``slr`` (Scaled Learning-rate Restarting, Le & Hua 2021): the dense schedule compressed
      to ``R`` steps, its warm-up replaced by ``max_lr``: ``eta_t = dense'[floor(j * T / R)]``
      where ``dense'[i] = max_lr`` for ``i`` in the dense warm-up, else ``dense_lrs[i]``;
    - ``clr`` (Cyclic Learning-rate Restarting, Le & Hua 2021): one cosine cycle from
      ``max_lr`` to ``min_lr``: ``eta_t = min_lr + (max_lr - min_lr) * (1 + cos(pi * j / R)) / 2``
      (the library's ``cosine`` schedule with ``min_lr`` and warm-up);
    - ``llr`` (Linear Learning-rate Restarting): ``eta_t = max_lr * (1 - j / R)`` (the
      library's ``linear`` schedule with warm-up);
    - ``allr`` (Adaptive LLR, the paper's proposal): LLR from ``lr`` (:func:`allr_lr`) instead
      of ``max_lr``.

    During the warm-up, ``eta_t = peak * (t + 1) / W``. ``finetune`` and ``linear_decay``
    (no warm-up) are handled by the caller."""
    n = epochs * steps_per_epoch
    warmup_epochs = WARMUP_SHARE * epochs
    max_lr = max(dense_lrs)
    if reset == "slr":
        total, warm = len(dense_lrs), int(round(warmup_epochs * steps_per_epoch))
        span = max(1, n - warm)
        scaled = [1.0 if i < dense_warmup_steps else v / max_lr for i, v in enumerate(dense_lrs)]

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return scaled[min(total - 1, (step - warm) * total // span)]

        return max_lr, {"name": "constant", "warmup_epochs": warmup_epochs}, factor
    if reset == "clr":
        min_lr = min(dense_lrs[dense_warmup_steps:] or dense_lrs)
        return max_lr, {"name": "cosine", "warmup_epochs": warmup_epochs, "min_lr": min_lr}, None
    if reset in ("llr", "allr"):
        peak = max_lr if reset == "llr" else lr
        if peak is None:
            raise ValueError("retraining_schedule: allr needs its initial learning rate (allr_lr)")
        return peak, {"name": "linear", "warmup_epochs": warmup_epochs}, None
    raise ValueError(f"retraining_schedule: {reset!r} is not one of slr, clr, llr, allr")


SUPERMASK_OUTPUTS = ("same", "half_rate", "dense")


@dataclass(frozen=True)
class SupermaskConfig:
    """Masks evaluated on the *untrained* initial weights (Zhou et al. 2019): after round 0,
    each criterion of (initial, trained) weights at each sparsity, with each kept-weight
    init, is scored on the test set without any training. ``outputs`` lists how the output
    layer is treated, each scored separately: ``same`` (pruned like the rest), ``half_rate``
    (pruned at half the rate of the others, as Zhou et al.'s ``--prune_base 0.8,0.9``) or
    ``dense``; the other layers then take the rest of the budget, so the total stays at the
    sparsity."""

    criteria: tuple[str, ...] = ("large_final_same_sign",)
    sparsities: tuple[float, ...] = ()
    inits: tuple[str, ...] = ("original", "signed_constant")
    scope: str = "uniform"
    outputs: tuple[str, ...] = ("same",)

    def __post_init__(self) -> None:
        for o in self.outputs:
            if o not in SUPERMASK_OUTPUTS:
                raise ConfigError(f"lottery.supermask.outputs entry {o!r} is not one of {', '.join(SUPERMASK_OUTPUTS)}")
        for c in self.criteria:
            CRITERIA.get(c)
        for s in self.sparsities:
            check_sparsity(s, "lottery.supermask.sparsities entry")
        for i in self.inits:
            KEPT_INITS.get(i)
        object.__setattr__(self, "scope", SCOPES.check(self.scope, "lottery.supermask.scope"))


@dataclass(frozen=True)
class LotterySettings:
    """The lottery procedure: how much each round prunes, by what, and the reset."""

    procedure: str = "imp"
    rounds: int = 5
    rate: float = 0.2
    output_rate: float | None = None
    layer_rates: dict[str, float] = field(default_factory=dict)
    scope: str = "uniform"
    criterion: str = "large_final"
    rewind: str = "0it"
    reset: str = "rewind"
    init: str = "original"
    reinit_distribution: str = "reset_parameters"
    retrain_epochs: int | None = None
    budget: int | None = None
    controls: tuple[str, ...] = ()
    segments: int = 2
    split: str = "classes"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    supermask: SupermaskConfig = field(default_factory=SupermaskConfig)

    def __post_init__(self) -> None:
        def known(value: str, names: Sequence[str], what: str) -> None:
            if value not in names:
                raise UnknownNameError(f"unknown lottery.{what} {value!r}; known: {', '.join(names)}")

        known(self.procedure, PROCEDURES, "procedure")
        object.__setattr__(self, "reset", LOTTERY_RESETS.check(self.reset, "lottery.reset"))
        object.__setattr__(self, "scope", IMP_SCOPES.check(self.scope, "lottery.scope"))
        known(self.split, SPLITS, "split")
        CRITERIA.get(self.criterion)
        KEPT_INITS.get(self.init)
        for c in self.controls:
            KEPT_INITS.get(c)
        check_int(self.rounds, "lottery.rounds", minimum=0, hint="pruning rounds after the dense one")
        if self.budget is not None:
            check_int(self.budget, "lottery.budget", minimum=1, hint="total epochs of BIMP, the dense phase included")
            if self.reset not in RETRAIN_RESETS:
                raise ConfigError(
                    f"lottery.budget splits epochs across retrainings, but lottery.reset={self.reset!r} replays the dense "
                    f"schedule; use one of {', '.join(RETRAIN_RESETS)} (BIMP uses allr or llr), or drop lottery.budget"
                )
            if self.retrain_epochs is not None:
                raise ConfigError(
                    "lottery.budget and lottery.retrain_epochs both set each round's epochs; keep one (budget: BIMP's "
                    "split of a total, retrain_epochs: the same epochs every round)"
                )
        elif self.reset in RETRAIN_RESETS and not self.retrain_epochs:
            raise ConfigError(f"lottery.reset={self.reset!r} trains each round for retrain_epochs; set "
                              "lottery.retrain_epochs (or lottery.budget for budgeted IMP)")
        if self.procedure == "colt":
            if self.segments < 2:
                raise ConfigError(f"lottery.segments must be >= 2 for COLT (one ticket per data segment), got {self.segments}")
            if self.reset != "rewind" or self.rewind not in ("0", "0it", "0ep"):
                raise ConfigError(
                    "COLT retrains every segment's copy from the initialisation: use lottery.reset: rewind with "
                    "lottery.rewind: 0it"
                )
        parse_duration(self.rewind, what="lottery.rewind", total_steps=1, steps_per_epoch=1)  # syntax only


@dataclass(frozen=True)
class LotteryConfig(HashedConfig):
    """A whole lottery-ticket experiment for one seed (``secateurs lottery``)."""

    name: str = "lottery"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: PhaseConfig = field(default_factory=PhaseConfig)
    lottery: LotterySettings = field(default_factory=LotterySettings)

    def __post_init__(self) -> None:
        if self.lottery.budget is not None:  # refuse a budget the rounds cannot fit before any training
            bimp_epochs(self.lottery.budget, self.train.epochs, self.lottery.rounds)


def load_lottery_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> LotteryConfig:
    return load_typed(LotteryConfig, path, overrides, "lottery config", drop=("seeds",),  # seeds: the CLI's list
                      prepare=partial(with_model_defaults, kind=LotteryConfig))


def config_seeds(path: str | Path) -> list[int]:
    """The ``seeds:`` list of a lottery config file (default: the config's ``seed``)."""
    data = read_yaml(path, "lottery config")
    seeds = data.get("seeds", [data.get("seed", 0)])
    if not isinstance(seeds, list):
        raise ConfigError(f"seeds in {path} must be a list of integers, got {seeds!r}")
    for s in seeds:
        check_int(s, f"each of the seeds in {path}", hint=f"seeds is {seeds!r}")
    return seeds


def run_lottery(
    config: LotteryConfig,
    run: RunDir,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    dataset: ImageDataset | None = None,
    wait: bool = False,
) -> dict:
    """Run (or resume, or re-read) the experiment in ``run``; returns its results. ``wait``:
    if another process holds the run, wait for it instead of refusing."""
    return execute(run, config, lambda data: _Lottery(config, run, data, progress, echo).run(), echo=echo,
                   dataset=dataset, wait=wait)


def control_seed(seed: int, round: int, init: str) -> int:
    """The generator seed of a control's kept-weight init: ``derive_seed(seed, "lottery",
    "control", round, init)``, stable across processes, so a re-run draws the same control."""
    return derive_seed(seed, "lottery", "control", round, init)


class _Lottery:
    """One seed's rounds: shared data, schedule arithmetic and checkpoint names."""

    def __init__(self, config: LotteryConfig, run: RunDir, dataset: ImageDataset, progress: bool, echo):
        self.config, self.run_dir, self.progress, self.echo = config, run, progress, echo
        self.lt = config.lottery
        self.data = _Data(config, dataset)
        self.dataset = self.data.dataset
        self.steps_per_epoch = len(self.data.train(0))
        self.total_steps = config.train.epochs * self.steps_per_epoch
        self.rewind_step = parse_duration(
            self.lt.rewind, what="lottery.rewind", total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch
        )
        if self.rewind_step > self.total_steps:
            raise ConfigError(
                f"lottery.rewind={self.lt.rewind!r} is step {self.rewind_step}, beyond the training run of "
                f"{self.total_steps} steps ({config.train.epochs} epochs x {self.steps_per_epoch}); rewind to an "
                "earlier iteration or train longer"
            )
        self.segments = self._segments() if self.lt.procedure == "colt" else []

    # -- plumbing -----------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.run_dir.checkpoint(name)

    def _round_json(self, r: int) -> Path:
        return self.run_dir.path / "rounds" / f"round-{r:02d}.json"

    def _new(self) -> tuple[torch.nn.Module, LotteryTicket]:
        """The seed's freshly initialised model and a ticket over it (no optimizer yet)."""
        model = build_model(self.config, self.dataset).to(self.data.device)
        lt = self.lt
        ticket = LotteryTicket(
            model, None, rate=lt.rate, output_rate=lt.output_rate, layer_rates=lt.layer_rates,
            scope=lt.scope, criterion=lt.criterion, rewind_step=self.rewind_step,
            reset="rewind" if lt.reset == "rewind" else "keep", init=lt.init,
            include=lt.include, exclude=lt.exclude, seed=self.config.seed,
        )
        return model, ticket

    def _load(self, path: Path) -> tuple[torch.nn.Module, LotteryTicket]:
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing: the run directory lost the saved initialisation / round state it needs; "
                "delete the run directory to start over"
            )
        state = load_checkpoint(path)
        model, ticket = self._new()
        model.load_state_dict(state["model"])
        ticket.load_state_dict(state["sparsifier"])
        return model, ticket

    def _save_start(self, path: Path, model, ticket: LotteryTicket) -> None:
        save_checkpoint(path, {"format": "secateurs.lottery-start/1", "model": model.state_dict(), "sparsifier": ticket.state_dict()})

    def _schedule(self, r: int) -> tuple[TrainConfig, int]:
        """The training config and start step of round ``r``'s trainings."""
        phase, cfg = self.config.train, self.config
        # every training of round r (the ticket, its controls, COLT's segment copies) sees the same batch order
        base = phase.train_config(seed=derive_seed(cfg.seed, "lottery", "round", r), device=cfg.device)
        reset = self.lt.reset
        if r == 0:
            return base, 0
        if reset in ("rewind", "lr_rewind"):
            return base, self.rewind_step
        epochs = self._retrain_epochs(r)
        if reset == "finetune":
            lr = self._final_lr()
            return replace(base, epochs=epochs, optimizer=replace(phase.optimizer, lr=lr),
                           lr_schedule={"name": "constant"}), 0
        if reset == "linear_decay":
            return replace(base, epochs=epochs, lr_schedule={"name": "linear"}), 0
        peak, schedule, _ = self._retraining(r)
        return replace(base, epochs=epochs, optimizer=replace(phase.optimizer, lr=peak), lr_schedule=schedule), 0

    def _retrain_epochs(self, r: int) -> int:
        """Epochs of round r >= 1's retraining: BIMP's share of the budget, else retrain_epochs."""
        if self.lt.budget is not None:
            return bimp_epochs(self.lt.budget, self.config.train.epochs, self.lt.rounds)[r]
        return self.lt.retrain_epochs

    def _dense_lrs(self) -> list[float]:
        """The dense phase's learning rate at each of its steps (the schedule of ``train``)."""
        if not hasattr(self, "_dense_lr_list"):
            phase = self.config.train
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=phase.optimizer.lr)
            factor = build_lr_schedule(opt, phase.lr_schedule, self.steps_per_epoch, phase.epochs).lr_lambdas[0]
            self._dense_lr_list = [phase.optimizer.lr * factor(t) for t in range(max(1, self.total_steps))]
        return self._dense_lr_list

    def _retraining(self, r: int) -> tuple[float, dict, Callable[[int], float] | None]:
        """Round r's SLR / CLR / LLR / ALLR schedule (:func:`retraining_schedule`)."""
        phase = self.config.train
        warm = int(round(phase.lr_schedule.warmup_epochs * self.steps_per_epoch))
        lr = self._allr(r)["lr"] if self.lt.reset == "allr" else None
        return retraining_schedule(self.lt.reset, self._dense_lrs(), warm, self._retrain_epochs(r),
                                   self.steps_per_epoch, lr)

    def _allr(self, r: int) -> dict:
        """ALLR's inputs and initial learning rate for round r, from round r-1's trained
        network and round r's pruned start (both on disk, so a resumed run gets the same)."""
        cache = self.__dict__.setdefault("_allr_cache", {})
        if r not in cache:
            trained, before = self._load(self._path(f"round-{r - 1:02d}"))
            pruned, after = self._load(self._path(f"round-{r:02d}-start"))
            full = sum(float(p.detach().double().pow(2).sum()) for p in trained.parameters())
            kept = sum(float(p.detach().double().pow(2).sum()) for p in pruned.parameters())
            drop = math.sqrt(abs(full - kept)) / math.sqrt(full) if full > 0 else 0.0
            active_before, active_after = sum(before.masks.active().values()), sum(after.masks.active().values())
            share = 1.0 - active_after / active_before if active_before else 0.0
            lr = allr_lr(max(self._dense_lrs()), drop, share, self._retrain_epochs(r), self.config.train.epochs)
            cache[r] = {"relative_norm_drop": drop, "pruned_share": share, "lr": lr}
        return cache[r]

    def _final_lr(self) -> float:
        """The learning rate at the last step of the dense schedule (fine-tuning's rate)."""
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=self.config.train.optimizer.lr)
        schedule = build_lr_schedule(opt, self.config.train.lr_schedule, self.steps_per_epoch, self.config.train.epochs)
        return self.config.train.optimizer.lr * schedule.lr_lambdas[0](max(0, self.total_steps - 1))

    def _segments(self) -> list[torch.Tensor]:
        """Indices of COLT's disjoint training segments: class groups or random parts."""
        labels = self.dataset.train_labels
        n = self.lt.segments
        if self.lt.split == "classes":
            classes = self.dataset.num_classes
            if n > classes:
                raise ConfigError(f"lottery.segments={n} class groups but {self.dataset.name} has {classes} classes")
            groups = torch.arange(classes).chunk(n)
            return [torch.isin(labels, g).nonzero().flatten() for g in groups]
        split_seed = derive_seed(self.config.seed, "lottery", "colt-split")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
        return [part.sort().values for part in order.chunk(n)]

    # -- one training -----------------------------------------------------------------------------
    def _train(self, name: str, r: int, start: Path, desc: str, *, subset=None, init: str | None = None) -> dict:
        """Train the network of ``start`` (optionally re-initialised by ``init``) on the
        training data (or a ``subset``) with round ``r``'s schedule; checkpoint as ``name``."""
        cfg, start_step = self._schedule(r)
        path = self._path(name)
        model, ticket = self._load(start)
        if init is not None and not path.is_file():
            gen = torch.Generator().manual_seed(control_seed(self.config.seed, r, init))
            names = ticket.masks.names()
            rewind_(model, ticket.rewind_point)
            init_kept_(init, model, ticket.masks.masks, {n: ticket.rewind_point[n] for n in names}, gen,
                       init=self.lt.reinit_distribution)
            ticket.masks.apply_()
        optimizer = build_optimizer(model, cfg.optimizer)
        ticket.optimizer = optimizer
        log = lambda record: self.run_dir.log({"phase": name, **record})  # noqa: E731
        trainer = Trainer(
            model, self.data.train(cfg.seed, subset), cfg, optimizer=optimizer, sparsifier=ticket,
            eval_data=self.data.test, val_data=self.data.val, checkpoint_path=path, callbacks=[log],
            start_step=start_step, progress=self.progress, progress_desc=desc,
        )
        if r > 0 and self.lt.reset == "slr":  # the compressed dense schedule is no library schedule: a LambdaLR of its own
            factor = self._retraining(r)[2]
            trainer.lr_schedule = LambdaLR(optimizer, [factor] * len(optimizer.param_groups))
        if trainer.resume():
            self.echo(f"resumed {name} at epoch {trainer.state.epoch}/{cfg.epochs}")
        started = time.perf_counter()
        trainer.fit()
        save_checkpoint(path, trainer.state_dict())
        return self._measure(trainer, ticket, time.perf_counter() - started)

    def _measure(self, trainer: Trainer, ticket: LotteryTicket, seconds: float) -> dict:
        final = trainer.evaluate(self.data.test)
        names = ticket.masks.names()
        weights = ticket.masks.weights()
        row: dict[str, Any] = {
            "test_acc": final["acc"], "test_loss": final["loss"], "steps": trainer.state.step, "time_s": seconds,
            "learning_distance": learning_distance(
                {n: ticket.rewind_point[n] for n in names}, weights, ticket.masks.masks
            )["distance"],
        }
        evaluations = [e for e in trainer.evaluations if "val_loss" in e and math.isfinite(e["val_loss"])]
        if evaluations:
            best = min(evaluations, key=lambda e: e["val_loss"])
            row.update(early_stop_step=best["step"], early_stop_val_loss=best["val_loss"],
                       early_stop_val_acc=best["val_acc"], early_stop_test_acc=best.get("test_acc"))
        return row

    # -- rounds -------------------------------------------------------------------------------------
    def _start(self, r: int) -> Path:
        """``round-RR-start.pt``: round r's masks and reset weights (made once)."""
        path = self._path(f"round-{r:02d}-start")
        if path.is_file():
            return path
        if r == 0:
            model, ticket = self._new()
        elif self.lt.procedure == "imp":
            model, ticket = self._load(self._path(f"round-{r - 1:02d}"))
            ticket.next_round()
        else:
            model, ticket = self._overlap(r)
        self._save_start(path, model, ticket)
        return path

    def _overlap(self, r: int) -> tuple[torch.nn.Module, LotteryTicket]:
        """COLT: prune every segment's trained copy of round r-1; keep the overlap."""
        pruned = []
        for i in range(self.lt.segments):
            model, ticket = self._load(self._path(f"round-{r - 1:02d}-segment-{i}"))
            ticket.next_round()  # pruned at the rate and rewound to the initialisation
            pruned.append((model, ticket))
        model, ticket = pruned[0]
        overlap = {n: torch.stack([t.masks[n] for _, t in pruned]).all(dim=0) for n in ticket.masks.names()}
        counts = {n: int(m.sum()) for n, m in overlap.items()}
        ticket.masks.update_(overlap, counts)
        ticket.masks.enforce_()
        return model, ticket

    def round(self, r: int) -> dict:
        lt = self.lt
        tag = f"round {r}/{lt.rounds}"
        start = self._start(r)
        _, ticket = self._load(start)
        stats = ticket.masks.stats()
        record: dict[str, Any] = {
            "round": r, "procedure": lt.procedure, "reset": lt.reset,
            "remaining": 1.0 - stats["sparsity"], "active": stats["active"], "numel": stats["numel"],
            "layers": {n: 1.0 - v["sparsity"] for n, v in stats["layers"].items()},
        }
        if r > 0:
            previous = self._load(self._path(f"round-{r - 1:02d}-start"))[1].masks.masks
            record["iou_with_previous"] = mask_iou(previous, ticket.masks.masks)["iou"]
        if r > 0 and lt.reset in RETRAIN_RESETS:
            cfg, _ = self._schedule(r)
            record["retrain"] = {"epochs": cfg.epochs, "lr": cfg.optimizer.lr, "lr_schedule": cfg.lr_schedule.name,
                                 "warmup_epochs": cfg.lr_schedule.warmup_epochs}
            if lt.reset == "allr":
                record["retrain"].update(self._allr(r))
            if lt.reset == "slr":
                record["retrain"]["lr_schedule"] = "slr"
        record["ticket"] = self._train(f"round-{r:02d}", r, start, f"{tag} ticket")
        if lt.procedure == "colt" and r < lt.rounds:
            segments = {}
            for i, subset in enumerate(self.segments):
                segments[str(i)] = self._train(f"round-{r:02d}-segment-{i}", r, start, f"{tag} segment {i}", subset=subset)
            record["segments"] = segments
        if r > 0:
            record["controls"] = {
                init: self._train(f"round-{r:02d}-{init}", r, start, f"{tag} {init}", init=init) for init in lt.controls
            }
        if r == 0 and lt.supermask.sparsities:
            self._supermasks(start)
        return record

    def _supermasks(self, start: Path) -> None:
        """Evaluate criterion masks on the untrained weights; writes ``supermask.json``."""
        sm = self.lt.supermask
        init_model, ticket = self._load(start)
        names = ticket.masks.names()
        initial = {n: ticket.rewind_point[n] for n in names}
        trained = load_checkpoint(self._path("round-00"))["model"]
        final = {n: trained[n] for n in names}
        rows = []
        last = names[-1]
        classes = self.dataset.num_classes
        if any(o != "same" for o in sm.outputs) and final[last].shape[0] != classes:
            # criterion_masks pins the last masked layer as "the output layer": never pin a hidden one
            raise ConfigError(
                f"lottery.supermask.outputs treats the last masked layer as the output layer, but {last} has "
                f"{final[last].shape[0]} outputs, not the {classes} classes; keep outputs: [same] for this model"
            )
        for criterion, sparsity, output in itertools.product(sm.criteria, sm.sparsities, sm.outputs):
            draw = derive_seed(self.config.seed, "lottery", "supermask", "mask", criterion, sparsity)
            out_sparsity = {"same": None, "dense": 0.0,
                            "half_rate": half_rate_output_sparsity([final[n].numel() for n in names], sparsity)}[output]
            masks = criterion_masks(initial, final, criterion, sparsity, scope=sm.scope,
                                    generator=torch.Generator().manual_seed(draw), output_sparsity=out_sparsity)
            kept = {n: int(m.sum()) for n, m in masks.items()}
            for init in sm.inits:
                model, _ = self._load(start)
                rewind_(model, ticket.rewind_point)
                init_seed = derive_seed(self.config.seed, "lottery", "supermask", "init", criterion, sparsity, init)
                init_kept_(init, model, masks, initial, torch.Generator().manual_seed(init_seed),
                           init=self.lt.reinit_distribution)
                probe = Trainer(model, self.data.train(0), TrainConfig(epochs=0, device=self.config.device), progress=False)
                metrics = probe.evaluate(self.data.test)
                row = {"criterion": criterion, "sparsity": sparsity, "init": init,
                       "test_acc": metrics["acc"], "test_loss": metrics["loss"]}
                if output != "same":  # rows of the default keep their old keys
                    row |= {"output": output, "layer_density": {n: kept[n] / final[n].numel() for n in names}}
                rows.append(row)
        atomic_write_text(self.run_dir.path / "supermask.json", json.dumps(rows, indent=2))

    def run(self) -> dict:
        results = self.run_dir.results()
        rounds: dict[int, dict] = {}
        for r in range(self.lt.rounds + 1):
            path = self._round_json(r)
            if path.is_file():
                rounds[r] = json.loads(path.read_text())
        todo = [r for r in range(self.lt.rounds + 1) if r not in rounds]
        if rounds:
            self.echo(f"{len(rounds)} round(s) already done in {self.run_dir.path}")
        for r in tqdm(todo, desc=f"{self.config.name} seed {self.config.seed}", disable=not self.progress,
                      unit="round", dynamic_ncols=True):
            rounds[r] = self.round(r)
            atomic_write_text(self._round_json(r), json.dumps(rounds[r], indent=2))
            self._write(results, rounds, complete=False)
        self._write(results, rounds, complete=True)
        return self.run_dir.results()

    def _write(self, results: dict, rounds: dict[int, dict], complete: bool) -> None:
        supermask = self.run_dir.path / "supermask.json"
        self.run_dir.write_results({
            **results, "config_hash": self.config.short_hash(), "model": self.config.model.name,
            "dataset": self.dataset.name, "seed": self.config.seed, "procedure": self.lt.procedure,
            "complete": complete, "rounds": [rounds[r] for r in sorted(rounds)],
            "supermask": json.loads(supermask.read_text()) if supermask.is_file() else [],
        })


# -- several seeds --------------------------------------------------------------------------------
def seed_config(config: LotteryConfig, seed: int) -> LotteryConfig:
    return replace(config, seed=seed)


def run_lottery_seeds(
    config: LotteryConfig, seeds: Sequence[int], runs_dir: str | Path, out_dir: str | Path | None = None,
    *, progress: bool = True, echo: Callable[[str], None] = print, executor="local", threads: int | None = None,
) -> dict:
    """Run every seed (a unit each, resumable on its own) on ``executor``, then aggregate what
    finished; seeds that failed are listed under ``failed``."""
    from .runner import Unit, failures, run_units

    units = [Unit(f"seed {seed}", seed_config(config, seed), run_lottery) for seed in seeds]
    outcomes = run_units(units, runs_dir, executor, progress=progress, echo=echo, threads=threads)
    summary = aggregate_lottery(config, seeds, runs_dir, out_dir)
    summary["failed"] = failures(outcomes)
    return summary


_METRICS = ("test_acc", "early_stop_test_acc", "early_stop_step", "learning_distance")


def aggregate_lottery(
    config: LotteryConfig, seeds: Sequence[int], runs_dir: str | Path, out_dir: str | Path | None = None
) -> dict:
    """Mean and std over seeds per round for the ticket and each control; supermask table;
    JSON, CSV, Markdown and the two figures of Frankle & Carbin (2019) into ``out_dir``."""
    out = Path(out_dir) if out_dir is not None else aggregate_dir(runs_dir, replace(config, seed=0), "lottery", sorted(seeds))
    per_seed, missing = {}, []
    for seed in seeds:
        run = RunDir.for_config(seed_config(config, seed), runs_dir)
        results = run.results() if run.results_path.is_file() else {}
        per_seed[seed] = results
        done = {r["round"] for r in results.get("rounds", [])}
        missing += [f"seed {seed} round {r}" for r in range(config.lottery.rounds + 1) if r not in done]
    rows = []
    for r in range(config.lottery.rounds + 1):
        records = [rec for res in per_seed.values() for rec in res.get("rounds", []) if rec["round"] == r]
        if not records:
            continue
        row: dict[str, Any] = {"round": r, "seeds": len(records), "remaining": mean_std([x["remaining"] for x in records])["mean"]}
        networks = {"ticket": [x["ticket"] for x in records]}
        for control in config.lottery.controls:
            networks[control] = [x["controls"][control] for x in records if control in x.get("controls", {})]
        for label, nets in networks.items():
            if nets:
                row[label] = {m: mean_std([n.get(m) for n in nets]) for m in _METRICS}
        rows.append(row)
    supermask: dict[tuple, list] = {}
    for res in per_seed.values():
        for x in res.get("supermask", []):
            supermask.setdefault((x["criterion"], x["sparsity"], x["init"], x.get("output", "same")), []).append(x["test_acc"])
    supermask_rows = [{"criterion": c, "sparsity": s, "init": i, "test_acc": mean_std(v), **({"output": o} if o != "same" else {})}
                      for (c, s, i, o), v in supermask.items()]
    summary = {"name": config.name, "seeds": list(seeds), "complete": not missing, "missing": missing,
               "rounds": rows, "supermask": supermask_rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "lottery.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "lottery.md", format_lottery(summary))
    atomic_write_text(out / "lottery.csv", _lottery_csv(rows, ["ticket", *config.lottery.controls]))
    if rows:
        from ..analysis.plots import plot_rounds

        labels = ["ticket", *config.lottery.controls]
        def series(metric):
            return {label: [(row["remaining"], row[label][metric]["mean"], row[label][metric]["std"])
                            for row in rows if label in row and row[label][metric]["mean"] is not None]
                    for label in labels}
        has_es = any(row["ticket"]["early_stop_step"]["mean"] is not None for row in rows)
        metric = "early_stop_test_acc" if has_es else "test_acc"
        plot_rounds(series(metric), out / "accuracy_vs_remaining.png",
                    "test accuracy at early stop (%)" if has_es else "final test accuracy (%)",
                    f"{config.name} (mean ± std, {len(seeds)} seeds)")
        if has_es:
            plot_rounds(series("early_stop_step"), out / "early_stop_vs_remaining.png", "early-stop iteration",
                        f"{config.name} (mean ± std, {len(seeds)} seeds)", scale=1.0)
    summary["dir"] = str(out)
    return summary


def _fmt(stat: dict | None, scale: float = 100.0, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    if stat.get("n") == 1:  # one seed: no spread to show
        return f"{scale * stat['mean']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def format_lottery(summary: dict) -> str:
    """Markdown: one row per round, ticket and controls side by side."""
    rows = summary["rounds"]
    labels = list(dict.fromkeys(k for row in rows for k, v in row.items() if isinstance(v, dict)))
    head = "| round | remaining (%) | " + " | ".join(
        f"{label} acc. at early stop | {label} early-stop it. | {label} final acc." for label in labels) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(labels))]
    for row in rows:
        cells = [str(row["round"]), f"{100 * row['remaining']:.3g}"]
        for label in labels:
            net = row.get(label) or {}
            cells += [_fmt(net.get("early_stop_test_acc")), _fmt(net.get("early_stop_step"), 1.0, 0), _fmt(net.get("test_acc"))]
        lines.append("| " + " | ".join(cells) + " |")
    if summary.get("supermask"):
        outputs = any("output" in x for x in summary["supermask"])
        extra = (" output layer |", "---|") if outputs else ("", "")
        lines += ["", f"| supermask criterion | sparsity | kept-weight init |{extra[0]} test acc. (no training) |",
                  "|---|---|---|" + extra[1] + "---|"]
        for x in summary["supermask"]:
            cell = f" {x.get('output', 'same')} |" if outputs else ""
            lines.append(f"| {x['criterion']} | {100 * x['sparsity']:g}% | {x['init']} |{cell} {_fmt(x['test_acc'])} |")
    return "\n".join(lines) + "\n"


def _lottery_csv(rows: list[dict], labels: Sequence[str]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["round", "remaining", "network", "seeds"] + [f"{m}_{s}" for m in _METRICS for s in ("mean", "std")])
    for row in rows:
        for label in labels:
            if label in row:
                stats = row[label]
                writer.writerow([row["round"], row["remaining"], label, row["seeds"]] + [
                    "" if stats[m][s] is None else stats[m][s] for m in _METRICS for s in ("mean", "std")])
    return buf.getvalue()
