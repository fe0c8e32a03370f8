"""Prune after training: train dense, then for each target sparsity prune and fine-tune.

Each phase ("dense", "sparsity-0.9", ...) checkpoints after every epoch into the run
directory; a finished phase is recorded in ``results.json`` and skipped on a re-run, an
unfinished one resumes from its last epoch. So an interrupted run loses at most one epoch
and re-running the same config never redoes finished work.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from ..data import BatchTransform, ImageDataset, InMemoryLoader, load_dataset
from ..methods import METHODS, Sparsifier
from ..errors import NonFiniteLossError
from ..models import MODELS, create_model
from ..train import Trainer, TrainConfig, build_optimizer, load_checkpoint, save_checkpoint
from ..train.loop import resolve_device
from .config import ExperimentConfig, PhaseConfig
from .runs import RunDir, atomic_write_text


def _train_config(phase: PhaseConfig, config: ExperimentConfig, index: int) -> TrainConfig:
    return TrainConfig(
        epochs=phase.epochs,
        optimizer=phase.optimizer,
        lr_schedule=phase.lr_schedule,
        seed=config.seed * 1000 + index,
        device=config.device,
        grad_clip=phase.grad_clip,
        label_smoothing=phase.label_smoothing,
    )


class _Data:
    """Loaders for one run: the whole dataset lives on the training device."""

    def __init__(self, config: ExperimentConfig, dataset: ImageDataset):
        self.config, self.dataset = config, dataset
        self.device = resolve_device(config.device)
        self.transform = BatchTransform(
            mean=dataset.mean, std=dataset.std, crop_padding=config.data.crop_padding, flip=config.data.flip
        )
        self.test = InMemoryLoader(
            dataset.test_images, dataset.test_labels, config.data.eval_batch_size,
            shuffle=False, transform=self.transform, device=self.device,
        )

    def train(self, seed: int) -> InMemoryLoader:
        augment = self.config.data.crop_padding > 0 or self.config.data.flip
        return InMemoryLoader(
            self.dataset.train_images, self.dataset.train_labels, self.config.data.batch_size,
            shuffle=True, transform=self.transform, augment=augment, device=self.device, seed=seed,
        )


def build_model(config: ExperimentConfig, dataset: ImageDataset) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    return create_model(
        config.model.name, num_classes=dataset.num_classes,
        in_channels=dataset.in_channels, image_size=dataset.image_size[0],
    )


def build_sparsifier(config: ExperimentConfig, model, optimizer) -> Sparsifier:
    p = config.prune
    return METHODS.get(p.method)(
        model, optimizer, scope=p.scope, include=p.include, exclude=p.exclude,
        keep_dense=p.keep_dense, layer_sparsity=p.layer_sparsity,
        allow_layer_collapse=p.allow_layer_collapse, seed=config.seed,
    )


def run_prune_finetune(
    config: ExperimentConfig,
    run: RunDir,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    dataset: ImageDataset | None = None,
) -> dict:
    """Run (or resume, or reuse) the experiment in ``run``; returns the results dict."""
    # Bad names and missing data fail before the run directory is created.
    METHODS.get(config.prune.method)
    MODELS.get(config.model.name)
    if run.results_path.is_file() and run.results().get("complete"):
        run.bind(config)
        echo(f"reusing finished run {run.path}")
        return run.results()
    dataset = dataset if dataset is not None else load_dataset(config.data.dataset, config.data.root)
    run.bind(config)
    try:
        with run.lock():
            return _run(config, run, dataset, progress, echo)
    except NonFiniteLossError as e:
        done = sorted(p.name for p in run.checkpoints.glob("*.pt")) if run.checkpoints.is_dir() else []
        raise NonFiniteLossError(
            f"{e} Finished phases are kept in {run.checkpoints} ({', '.join(done) or 'none yet'})."
        ) from None


def _run(config: ExperimentConfig, run: RunDir, dataset: ImageDataset, progress: bool, echo) -> dict:
    results = run.results()
    data = _Data(config, dataset)
    model = build_model(config, dataset)
    results.update(config_hash=config.short_hash(), model=config.model.name, dataset=dataset.name)
    rows: dict[str, dict] = {r["phase"]: r for r in results.get("levels", [])}

    def log(phase: str, sparsity: float) -> Callable[[dict], None]:
        return lambda record: run.log({"phase": phase, "target_sparsity": sparsity, **record})

    # -- dense training ------------------------------------------------------------------
    dense_ckpt = run.checkpoint("dense")
    if "dense" in rows and dense_ckpt.is_file():
        model.load_state_dict(load_checkpoint(dense_ckpt)["model"])
    else:
        trainer = Trainer(
            model, data.train(config.seed * 1000), _train_config(config.train, config, 0),
            eval_data=data.test, checkpoint_path=dense_ckpt, callbacks=[log("dense", 0.0)],
            progress=progress, progress_desc="dense",
        )
        if trainer.resume():
            echo(f"resumed dense training at epoch {trainer.state.epoch}/{config.train.epochs}")
        history = trainer.fit()
        save_checkpoint(dense_ckpt, trainer.state_dict())
        final = trainer.evaluate(data.test)
        rows["dense"] = {
            "phase": "dense", "target_sparsity": 0.0, "sparsity": 0.0,
            "acc_before_finetune": final["acc"], "test_acc": final["acc"], "test_loss": final["loss"],
            "epochs": len(history), "layers": {},
        }
        _save(run, results, rows, complete=False)

    # -- prune levels --------------------------------------------------------------------
    previous = dense_ckpt
    for index, target in enumerate(config.prune.sparsities, start=1):
        phase = f"sparsity-{target:g}"
        ckpt = run.checkpoint(phase)
        start = previous if config.prune.cumulative else dense_ckpt
        optimizer = build_optimizer(model, config.finetune.optimizer)
        sparsifier = build_sparsifier(config, model, optimizer)
        if phase in rows and ckpt.is_file():
            state = load_checkpoint(ckpt)
            model.load_state_dict(state["model"])
            sparsifier.load_state_dict(state["sparsifier"])
            previous = ckpt
            continue
        _load_start(model, sparsifier, start)
        trainer = Trainer(
            model, data.train(config.seed * 1000 + index), _train_config(config.finetune, config, index),
            optimizer=optimizer, sparsifier=sparsifier, eval_data=data.test, checkpoint_path=ckpt,
            callbacks=[log(phase, target)], progress=progress,
            progress_desc=f"sparsity {target:g} ({index}/{len(config.prune.sparsities)})",
        )
        pending = run.path / f".{phase}.pruned.json"
        if trainer.resume():
            echo(f"resumed {phase} at epoch {trainer.state.epoch}/{config.finetune.epochs}")
            before = float(_read_json(pending).get("acc_before_finetune", math.nan))
        else:
            sparsifier.prune(target)
            before = trainer.evaluate(data.test)["acc"]
            atomic_write_text(pending, json.dumps({"acc_before_finetune": before}))
        history = trainer.fit()
        save_checkpoint(ckpt, trainer.state_dict())
        final = trainer.evaluate(data.test)
        stats = sparsifier.stats()
        rows[phase] = {
            "phase": phase, "target_sparsity": target, "sparsity": stats["sparsity"],
            "acc_before_finetune": before, "test_acc": final["acc"], "test_loss": final["loss"],
            "epochs": len(history), "active": stats["active"], "numel": stats["numel"],
            "layers": {n: v["sparsity"] for n, v in stats["layers"].items()},
        }
        _save(run, results, rows, complete=False)
        pending.unlink(missing_ok=True)
        previous = ckpt

    _save(run, results, rows, complete=True)
    return run.results()


def _load_start(model, sparsifier: Sparsifier, path: Path) -> None:
    """Start a level from a finished phase: its weights and, if it was sparse, its masks."""
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    if state.get("sparsifier") is not None:
        sparsifier.masks.load_state_dict(state["sparsifier"]["masks"])
        sparsifier.masks.apply_()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(run: RunDir, results: dict, rows: dict[str, dict], complete: bool) -> None:
    ordered = sorted(rows.values(), key=lambda r: r["target_sparsity"])
    run.write_results({**results, "complete": complete, "levels": ordered})
