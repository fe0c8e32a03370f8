"""A sparsity sweep: one run directory, a dense phase and one phase per target sparsity.

How a level is made depends on when the method prunes (``Sparsifier.timing``):

- ``after``: prune the trained dense network, then fine-tune (``finetune`` phase);
- ``init``: prune the freshly initialised network, then train it (``train`` phase);
- ``during``: train from the same initialisation with the method's sparsifier running its
  schedule (``train`` phase), e.g. GMP, RigL, GraNet.

Each phase ("dense", "sparsity-0.9", ...) checkpoints after every epoch into the run
directory; a finished phase is recorded in ``results.json`` and skipped on a re-run, an
unfinished one resumes from its last epoch. So an interrupted run loses at most one epoch
and re-running the same config never redoes finished work.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..data import BatchTransform, ImageDataset, InMemoryLoader
from ..methods import METHODS, Sparsifier
from ..analysis.flops import flops_report, inference_flops, layer_macs
from ..errors import ConfigError, NonFiniteLossError, SparsityMismatchError
from ..masks import select_prunable
from ..models import create_model
from ..train import Trainer, TrainConfig, build_optimizer, load_checkpoint, save_checkpoint
from ..seeding import derive_seed
from ..train.loop import resolve_device
from .config import ExperimentConfig, PhaseConfig
from .runs import RunDir, atomic_write_text, execute


def _train_config(phase: PhaseConfig, config, seed: int, health: str = "error") -> TrainConfig:
    """``phase`` as the loop's config, seeded by ``seed`` (a :func:`~secateurs.seeding.derive_seed`
    of the user's seed for the procedure and phase, never an offset of it)."""
    return phase.train_config(seed=seed, device=config.device, health=health)


class _Data:
    """Loaders for one run: the whole dataset lives on the training device."""

    def __init__(self, config, dataset: ImageDataset):
        if config.data.validation and dataset.val_images is None:
            # one fixed split (seed 0) for every seed and method, so selection is comparable
            dataset = dataset.holdout(config.data.validation, seed=0)
        if config.data.label_noise:
            # training labels only, after the holdout: validation and test stay clean
            dataset = dataset.with_label_noise(config.data.label_noise, derive_seed(config.seed, "data", "label-noise"))
        self.config, self.dataset = config, dataset
        self.device = resolve_device(config.device)
        self.transform = BatchTransform(
            mean=dataset.mean, std=dataset.std, crop_padding=config.data.crop_padding, flip=config.data.flip
        )
        self.test = InMemoryLoader(
            dataset.test_images, dataset.test_labels, config.data.eval_batch_size,
            shuffle=False, transform=self.transform, device=self.device,
        )
        self.val = None
        if dataset.val_images is not None:
            self.val = InMemoryLoader(
                dataset.val_images, dataset.val_labels, config.data.eval_batch_size,
                shuffle=False, transform=self.transform, device=self.device,
            )

    def example(self) -> torch.Tensor:
        """One normalised test image (batch of 1), for counting FLOPs."""
        return next(iter(self.test))[0][:1]

    def probe(self) -> InMemoryLoader:
        """Unshuffled, unaugmented training batches for methods that look at data (SNIP,
        CTRE): the same sequence on every call, so a resumed run draws the same batches."""
        return InMemoryLoader(
            self.dataset.train_images, self.dataset.train_labels, self.config.data.batch_size,
            shuffle=False, transform=self.transform, device=self.device,
        )

    def train(self, seed: int, subset: torch.Tensor | None = None) -> InMemoryLoader:
        """Shuffled (and augmented, if configured) training batches; ``subset`` indexes a
        part of the training set (COLT's data segments)."""
        augment = self.config.data.crop_padding > 0 or self.config.data.flip
        images, labels = self.dataset.train_images, self.dataset.train_labels
        if subset is not None:
            images, labels = images[subset], labels[subset]
        return InMemoryLoader(
            images, labels, self.config.data.batch_size,
            shuffle=True, transform=self.transform, augment=augment, device=self.device, seed=seed,
        )


def phase_trainer(data: _Data, run: RunDir, config, model, name: str, phase: PhaseConfig, index: int | None,
                  desc: str, progress: bool, *, procedure: str | None = None) -> Trainer:
    """A Trainer for one named phase of a run, checkpointed every epoch to
    ``checkpoints/<name>.pt``, its epoch records appended to the run's log. Its data order and
    training seed are ``derive_seed(config.seed, procedure, name)``: the procedure (e.g.
    ``"structured"``) and the phase's name. ``index`` is what was once the seed offset
    (``config.seed * 1000 + index``) and must now be None."""
    if procedure is None or index is not None:
        raise ConfigError("phase_trainer seeds a phase by derive_seed(seed, procedure, name): pass procedure='...' "
                          f"and index=None (got procedure={procedure!r}, index={index!r})")
    seed = derive_seed(config.seed, procedure, name)
    cfg = _train_config(phase, config, seed)
    log = lambda record: run.log({"phase": name, **record})  # noqa: E731
    return Trainer(model, data.train(cfg.seed), cfg, eval_data=data.test, val_data=data.val,
                   checkpoint_path=run.checkpoint(name), callbacks=[log], progress=progress, progress_desc=desc)


def build_model(config: ExperimentConfig, dataset: ImageDataset) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    return create_model(
        config.model.name, num_classes=dataset.num_classes,
        in_channels=dataset.in_channels, image_size=dataset.image_size[0], init=config.model.init,
    )


def build_sparsifier(
    config: ExperimentConfig, model, optimizer, *, sparsity: float | None = None,
    total_steps: int | None = None, steps_per_epoch: int | None = None, batches=None,
) -> Sparsifier:
    """The configured method's sparsifier; ``params`` typos raise with the accepted names."""
    p = config.prune
    factory = METHODS.get(p.method)
    kwargs = dict(
        include=p.include, exclude=p.exclude, keep_dense=p.keep_dense, layer_sparsity=p.layer_sparsity,
        allow_layer_collapse=p.allow_layer_collapse, seed=config.seed,
    )
    if p.scope is not None:
        kwargs["scope"] = p.scope
    if factory.timing == "during":
        kwargs.update(sparsity=sparsity, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    if factory.timing in ("during", "init"):
        kwargs["batches"] = batches
    clash = sorted(set(p.params) & (set(kwargs) | _SHARED))
    if clash:
        raise ConfigError(
            f"prune.params {clash} are set elsewhere, not in params: the sparsity by prune.sparsities, the scope and "
            "the layers by prune.*, the seed at the top, the step counts by train.epochs and data.batch_size, the model, "
            "optimizer and batches by the sweep; remove them from params"
        )
    known = _accepted_params(factory)
    unknown = sorted(set(p.params) - set(known) - _SHARED)
    if unknown:
        raise ConfigError(
            f"method {p.method!r} does not take {', '.join(map(repr, unknown))} in prune.params; "
            f"it accepts: {', '.join(known) or 'no parameters'}"
        )
    return factory(model, optimizer, **kwargs, **p.params)


_SHARED = {"model", "optimizer", "sparsity", "total_steps", "steps_per_epoch", "scope", "kwargs", "self",
           "include", "exclude", "keep_dense", "layer_sparsity", "allow_layer_collapse", "seed", "batches"}


def _accepted_params(factory) -> list[str]:
    """The method's own hyperparameters (those ``prune.params`` may set): the keyword
    parameters its recipe classes declare. The base sparsifier's plumbing (score, schedules,
    initial mask) is the recipe's business, not the config's."""
    import inspect

    names: list[str] = []
    for cls in factory.__mro__:
        if cls is Sparsifier or cls is object:
            break
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        names += [n for n, v in params.items() if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)]
    return [n for n in dict.fromkeys(names) if n not in _SHARED and n not in ("score", "types")]


def check_sweep(config: ExperimentConfig, dense_only: bool = False) -> None:
    """The checks that need no data (device, model and method names, the levels), so a bad
    name fails before a run directory is created or anything is copied into one.

    A sweep prunes: one without ``prune.sparsities`` is refused rather than run as a
    dense-only job nobody asked for, unless ``dense_only`` says that is the point (the dense
    line of a comparison)."""
    from ..models import MODELS
    from .config import check_device

    check_device(config.device)
    MODELS.get(config.model.name)
    METHODS.get(config.prune.method)
    if not config.prune.sparsities and not dense_only:
        raise ConfigError(
            f"prune.sparsities is empty, so {config.prune.method!r} would prune nothing and only the dense network "
            "would train. Give the levels: --sparsity 0.9 (repeat for more) or prune.sparsities: [0.9, 0.95]"
        )
    if config.prune.sparsities and dense_only:
        raise ConfigError(f"dense_only=True but prune.sparsities is {list(config.prune.sparsities)}; drop one of them")


def run_sweep(
    config: ExperimentConfig,
    run: RunDir,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    dataset: ImageDataset | None = None,
    dense_only: bool = False,
    start_from: RunDir | None = None,
    wait: bool = False,
) -> dict:
    """Run (or resume, or reuse) the experiment in ``run``; returns the results dict.
    ``wait``: if another process holds the run, wait for it instead of refusing.

    ``start_from``: another run whose dense phase this one may start from (``secateurs train
    --resume DIR --set ...``): when :func:`dense_reuse` allows it and ``run`` has no dense
    phase of its own, its dense checkpoint (finished, or an interrupted one's last epoch,
    which is then continued), log and row are copied in, after every check has passed."""
    check_sweep(config, dense_only)
    return execute(run, config, lambda data: _Sweep(config, run, data, progress, echo, start_from).run(),
                   echo=echo, dataset=dataset, wait=wait)


#: Config sections the dense phase does not read: a run that differs from another only here
#: can start from the other's dense phase.
_AFTER_DENSE = ("name", "prune", "finetune")


def dense_reuse(old: RunDir, config: ExperimentConfig) -> str | None:
    """Why ``config``'s run (a changed version of the run in ``old``) cannot start from
    ``old``'s dense phase, or None when it can: the new run trains a dense phase, the keys that
    changed are none the dense phase reads, and ``old`` has a dense checkpoint."""
    reads = [k for k in old.changes(config) if k.split(".")[0] not in _AFTER_DENSE]
    if reads:
        return f"the dense phase reads the changed key(s) {', '.join(reads[:8])}"
    timing = METHODS.get(config.prune.method).timing
    if not (timing == "after" or config.prune.dense_baseline):
        return (f"the new run trains no dense phase ({config.prune.method} prunes "
                f"{'at initialisation' if timing == 'init' else 'during training'} and prune.dense_baseline is false)")
    if not old.checkpoint("dense").is_file():
        return f"{old.path} has no dense checkpoint yet"
    return None


class _Sweep:
    """One sweep's shared context (config, run directory, data, FLOP counts) and its phases."""

    def __init__(self, config: ExperimentConfig, run: RunDir, dataset: ImageDataset, progress: bool, echo,
                 start_from: RunDir | None = None):
        self.config, self.run_dir, self.dataset = config, run, dataset
        self.progress, self.echo = progress, echo
        self.start_from = start_from if start_from is not None and dense_reuse(start_from, config) is None else None
        self.data = _Data(config, dataset)
        self.timing = METHODS.get(config.prune.method).timing
        if self.timing == "during" and config.prune.reset != "keep":
            raise ConfigError(
                f"prune.reset {config.prune.reset!r} does not apply to {config.prune.method!r}, which prunes during "
                "training from the initialisation; remove prune.reset (resets apply to at-init and after-training methods)"
            )
        probe = build_model(config, dataset)
        prunable = list(select_prunable(probe, config.prune.include, config.prune.exclude))
        self.macs = layer_macs(probe, self.data.example(), prunable)
        self._check_method()

    def _check_method(self) -> None:
        """Build the method's sparsifier for every level before any training, so a setting it
        refuses (a schedule point past the end of training, an unknown parameter) fails now,
        not after hours of dense training. Nothing is pruned; the RNG is left as it was."""
        config = self.config
        steps = len(self.data.train(0))
        with torch.random.fork_rng(devices=[]):
            for target in config.prune.sparsities:
                model = build_model(config, self.dataset)
                optimizer = build_optimizer(model, config.train.optimizer)
                build_sparsifier(config, model, optimizer, sparsity=target, total_steps=steps * config.train.epochs,
                                 steps_per_epoch=steps, batches=self.data.probe)

    def _trainer(self, model, phase: str, target: float, train_data, cfg, desc: str, **kwargs) -> Trainer:
        log = lambda record: self.run_dir.log({"phase": phase, "target_sparsity": target, **record})  # noqa: E731
        return Trainer(model, train_data, cfg, eval_data=self.data.test, val_data=self.data.val, checkpoint_path=self.run_dir.checkpoint(phase),
                       callbacks=[log], progress=self.progress, progress_desc=desc, **kwargs)

    def run(self) -> dict:
        config, run = self.config, self.run_dir
        results = run.results()
        results.update(
            config_hash=config.short_hash(), model=config.model.name, dataset=self.dataset.name,
            method=config.prune.method, timing=self.timing,
        )
        rows: dict[str, dict] = {r["phase"]: r for r in results.get("levels", [])}
        if self.start_from is not None and "dense" not in rows and not run.checkpoint("dense").is_file():
            row = self._adopt_dense(self.start_from)
            if row is not None:
                rows["dense"] = row
                _save(run, results, rows, complete=False)
        phase = "dense"
        try:
            model = build_model(config, self.dataset)
            if self.timing == "after" or config.prune.dense_baseline:
                if "dense" in rows and run.checkpoint("dense").is_file():
                    model.load_state_dict(load_checkpoint(run.checkpoint("dense"))["model"])
                else:
                    rows["dense"] = self.dense(model)
                    _save(run, results, rows, complete=False)
            previous = run.checkpoint("dense")
            levels = config.prune.sparsities
            for index, target in enumerate(levels, start=1):
                phase = f"sparsity-{target:g}"
                desc = f"{config.prune.method} {target:g} ({index}/{len(levels)})"
                if not (phase in rows and run.checkpoint(phase).is_file()):
                    if self.timing == "after":
                        rows[phase] = self.after_training_level(model, target, previous, desc)
                    else:
                        rows[phase] = self.sparse_training_level(target, desc)
                    _save(run, results, rows, complete=False)
                previous = run.checkpoint(phase)
        except NonFiniteLossError as e:
            raise self._diverged(phase, e) from None
        _save(run, results, rows, complete=True)
        return run.results()

    def _adopt_dense(self, old: RunDir) -> dict | None:
        """Start from ``old``'s dense phase (see :func:`run_sweep`): its log lines and its
        checkpoint, which :meth:`dense` continues if it was interrupted; returns its row if
        it finished."""
        run = self.run_dir
        for record in old.metrics():
            if record.get("phase") == "dense":
                run.log(record)
        distributed.on_main(_copy_into, old.checkpoint("dense"), run.checkpoint("dense"))  # rank 0 copies
        return next((r for r in old.results().get("levels", []) if r.get("phase") == "dense"), None)

    def _diverged(self, phase: str, error: NonFiniteLossError) -> NonFiniteLossError:
        """The divergence of ``phase``, with the command that goes on at a lower learning rate."""
        config, run = self.config, self.run_dir
        done = sorted(p.name for p in run.checkpoints.glob("*.pt")) if run.checkpoints.is_dir() else []
        section = "finetune" if phase != "dense" and self.timing == "after" else "train"
        lr = getattr(config, section).optimizer.lr
        reuse = " (a new run directory that starts from this run's finished dense phase)" if section == "finetune" else ""
        return NonFiniteLossError(
            f"{phase}: {error} Finished phases are kept in {run.checkpoints} ({', '.join(done) or 'none yet'}). "
            f"To go on with a lower learning rate: secateurs train --resume {run.path} --set {section}.optimizer.lr={lr / 10:g}"
            f"{reuse}"
        )

    def dense(self, model) -> dict:
        config = self.config
        seed = derive_seed(config.seed, "sweep", "dense")
        trainer = self._trainer(model, "dense", 0.0, self.data.train(seed), _train_config(config.train, config, seed),
                                "dense")
        if trainer.resume():
            self.echo(f"resumed dense training at epoch {trainer.state.epoch}/{config.train.epochs}")
        history = trainer.fit()
        save_checkpoint(self.run_dir.checkpoint("dense"), trainer.state_dict())
        final = trainer.evaluate(self.data.test)
        return {
            "phase": "dense", "target_sparsity": 0.0, "sparsity": 0.0,
            "acc_before_finetune": final["acc"] if self.timing == "after" else None,
            "test_acc": final["acc"], "test_loss": final["loss"],
            "epochs": len(history), "layers": {}, "flops": _flops(self.macs, [], 1, {}),
            "health": trainer.health,
        }

    def after_training_level(self, model, target: float, previous: Path, desc: str) -> dict:
        """Prune the trained network (or the previous level) to ``target``, reset the
        weights per ``prune.reset``, and fine-tune."""
        config, run = self.config, self.run_dir
        phase = f"sparsity-{target:g}"
        start = previous if config.prune.cumulative else run.checkpoint("dense")
        optimizer = build_optimizer(model, config.finetune.optimizer)
        sparsifier = build_sparsifier(config, model, optimizer)
        _load_start(model, sparsifier, start)
        seed = derive_seed(config.seed, "sweep", phase)
        trainer = self._trainer(model, phase, target, self.data.train(seed), _train_config(config.finetune, config, seed),
                                desc,
                                optimizer=optimizer, sparsifier=sparsifier)
        pending = run.path / f".{phase}.pruned.json"
        if trainer.resume():
            self.echo(f"resumed {phase} at epoch {trainer.state.epoch}/{config.finetune.epochs}")
            before = float(_read_json(pending).get("acc_before_finetune", math.nan))
        else:
            sparsifier.prune(target)
            _reset(config, model, sparsifier, self.dataset)
            before = trainer.evaluate(self.data.test)["acc"]
            atomic_write_text(pending, json.dumps({"acc_before_finetune": before}))
        history = trainer.fit()
        save_checkpoint(run.checkpoint(phase), trainer.state_dict())
        row = _level_row(phase, target, trainer, sparsifier, self.data, history, before)
        # the training cost is dense pre-training plus fine-tuning; only the inference share
        # is a property of the method here
        row["flops"] = {"inference": inference_flops(self.macs, _densities(sparsifier))["fraction"], "training": None}
        pending.unlink(missing_ok=True)
        return row

    def sparse_training_level(self, target: float, desc: str) -> dict:
        """Train from the seed's initialisation with the sparsifier: pruned once at init
        (``init``) or along the method's own schedule (``during``)."""
        config = self.config
        phase = f"sparsity-{target:g}"
        model = build_model(config, self.dataset).to(self.data.device)  # the same init for every level
        optimizer = build_optimizer(model, config.train.optimizer)
        seed = derive_seed(config.seed, "sweep", phase)
        train_data = self.data.train(seed)
        total = len(train_data) * config.train.epochs
        sparsifier = build_sparsifier(
            config, model, optimizer, sparsity=target, total_steps=total,
            steps_per_epoch=len(train_data), batches=self.data.probe,
        )
        trainer = self._trainer(model, phase, target, train_data, _train_config(config.train, config, seed), desc,
                                optimizer=optimizer, sparsifier=sparsifier)
        if trainer.resume():
            self.echo(f"resumed {phase} at epoch {trainer.state.epoch}/{config.train.epochs}")
        elif self.timing == "init":
            sparsifier.prune(target)
            _reset(config, model, sparsifier, self.dataset)
        history = trainer.fit()
        save_checkpoint(self.run_dir.checkpoint(phase), trainer.state_dict())
        row = _level_row(phase, target, trainer, sparsifier, self.data, history, None)
        fixed = config.prune.keep_dense or config.prune.layer_sparsity
        if abs(row["sparsity"] - target) > 0.5 / row["numel"] + 1e-12 and not fixed:
            raise SparsityMismatchError(
                f"{config.prune.method} ended {phase} at sparsity {row['sparsity']:.6f}, not the target {target}; "
                "its schedule must reach the target before training ends (check prune.params end / every)"
            )
        initial = {n: 1.0 for n in self.macs}
        row["flops"] = _flops(self.macs, sparsifier.history, total, _densities(sparsifier), initial)
        row["updates"] = sum(1 for h in sparsifier.history if h["kind"] != "init")
        return row


def _reset(config: ExperimentConfig, model, sparsifier: Sparsifier, dataset: ImageDataset) -> None:
    """Give the pruned network its starting weights (``prune.reset``): the initialisation
    of this seed (``rewind``) or of an unrelated seed (``reinit``), every parameter and
    buffer, with the new mask applied. For an at-init method ``rewind`` is ``keep`` (it
    pruned the initialisation) and ``reinit`` trains the mask from independent weights, as
    the SNIP reference code does (it scores one draw and trains another)."""
    if config.prune.reset == "keep":
        return
    seed = config.seed if config.prune.reset == "rewind" else derive_seed(config.seed, "sweep", "reinit")
    start = build_model(replace(config, seed=seed), dataset).state_dict()
    model.load_state_dict(start)
    sparsifier.masks.apply_()


def _level_row(phase, target, trainer, sparsifier, data, history, before) -> dict:
    final = trainer.evaluate(data.test)
    stats = sparsifier.stats()
    return {
        "phase": phase, "target_sparsity": target, "sparsity": stats["sparsity"],
        "acc_before_finetune": before, "test_acc": final["acc"], "test_loss": final["loss"],
        "epochs": len(history), "active": stats["active"], "numel": stats["numel"],
        "layers": {n: v["sparsity"] for n, v in stats["layers"].items()},
        "health": trainer.health,
    }


def _densities(sparsifier: Sparsifier) -> dict[str, float]:
    return {n: 1.0 - s for n, s in sparsifier.masks.layer_sparsity().items()}


def _flops(macs, events, total_steps, final_density, initial=None) -> dict:
    """Inference and training FLOPs as fractions of dense (GraNet Table 3 style)."""
    report = flops_report(macs, events, total_steps, final_density or None, initial_density=initial)
    return {"inference": report["inference"]["fraction"], "training": report["training"]["fraction"]}


def _load_start(model, sparsifier: Sparsifier, path: Path) -> None:
    """Start a level from a finished phase: its weights and, if it was sparse, its masks."""
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    if state.get("sparsifier") is not None:
        sparsifier.masks.load_state_dict(state["sparsifier"]["masks"])
        sparsifier.masks.apply_()


def _copy_into(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary file, so ``target`` is never half-written."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.copy"
    shutil.copyfile(source, tmp)
    tmp.replace(target)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(run: RunDir, results: dict, rows: dict[str, dict], complete: bool) -> None:
    ordered = sorted(rows.values(), key=lambda r: r["target_sparsity"])
    run.write_results({**results, "complete": complete, "levels": ordered})
