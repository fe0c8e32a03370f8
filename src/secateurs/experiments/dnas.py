"""The DNAS search with tiered pruning (:mod:`secateurs.search.dnas`; Kierat et al. 2022,
PruNet) as a resumable unit of the experiment layer.

:class:`DNASUnitConfig` names the run directory by the hash of everything that decides the
search: seed, device, data, :class:`~secateurs.search.dnas.DNASSettings`, the split between
weight and architecture batches, and the latency model (``latency``: ``"table"``, measured on
this machine by :class:`secateurs.search.cost.LatencyTable`, or ``"macs"``, the
machine-independent MACs stand-in). ``latency_table`` is only where the measured table is
cached: a file shared by every unit of a study, machine-specific, so it is kept out of the hash
and out of the saved config (two studies caching their tables in different places share their
searches' run directories). What the search used is still fixed once it starts: every latency
it read is kept in its checkpoint, so a resumed search sees the same values.

:func:`run_dnas_unit` runs the search one epoch at a time, checkpointing atomically after
every epoch (``checkpoints/search.pt``: the search state and both data orders), so an
interrupted unit resumes from its last epoch and ends with the same results as an uninterrupted
one (same device and threads). It does not retrain the derived network: the caller trains
``results["architecture"]`` from scratch like any candidate
(:func:`secateurs.search.space.build`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ConfigError
from ..search.dnas import DNASSettings
from ..seeding import derive_seed
from ..validate import check_bool, check_int, check_number
from .config import DataConfig, HashedConfig, check_device
from .runs import RunDir, execute

__all__ = ["DNASUnitConfig", "run_dnas_unit"]

LATENCIES = ("table", "macs")


@dataclass(frozen=True)
class DNASUnitConfig(HashedConfig):
    """One DNAS search. ``data.batch_size`` is the weight batch (``arch_batch_size``, None: the
    same, the architecture's); ``arch_fraction`` of the training images (after any
    ``data.validation`` holdout, which the search never sees) form the architecture set, a fixed
    split by ``derive_seed(seed, "dnas", "split")`` (FBNet's 80 / 20); ``subset`` limits the
    training images the search uses (None: all). ``evaluate``: also report the derived
    network's test accuracy inside the supernet (shared weights, not retrained)."""

    name: str = "dnas"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="fashion-mnist"))
    search: DNASSettings = field(default_factory=DNASSettings)
    arch_fraction: float = 0.2
    arch_batch_size: int | None = None
    subset: int | None = 10000
    latency: str = "table"
    latency_table: str | None = None
    evaluate: bool = True

    def __post_init__(self) -> None:
        check_int(self.seed, "seed")
        check_device(self.device)
        check_number(self.arch_fraction, "arch_fraction", above=0, below=1,
                     hint="the fraction of the training images the architecture is trained on, e.g. 0.2")
        check_int(self.arch_batch_size, "arch_batch_size", minimum=1, optional=True)
        check_int(self.subset, "subset", minimum=2, optional=True, hint="training images the search uses (null: all)")
        check_bool(self.evaluate, "evaluate")
        if self.latency not in LATENCIES:
            raise ConfigError(f"unknown latency {self.latency!r}; use 'table' (measured on this machine, cached at "
                              "latency_table) or 'macs' (multiply-accumulates, the same everywhere)")
        if self.latency_table is not None and (not isinstance(self.latency_table, str) or not self.latency_table):
            raise ConfigError(f"latency_table must be a file path or null, got {self.latency_table!r}")
        if self.latency == "macs" and self.latency_table is not None:
            raise ConfigError("latency_table is set but latency is 'macs', which reads no table; drop latency_table "
                              "or set latency: table")

    def to_dict(self) -> dict:
        """The config without ``latency_table`` (where a cache lives is not part of a run)."""
        out = super().to_dict()
        out.pop("latency_table", None)
        return out


def _latency_function(config: DNASUnitConfig, echo):
    """``latency(block, in_shape)``, a description of where it comes from, and the table (or None)."""
    from ..search.dnas import macs_latency

    if config.latency == "macs":
        return macs_latency, {"latency": "macs", "unit": "seconds at 1 GMAC/s"}, None
    from ..search.cost import LatencyTable

    table = LatencyTable.open(config.latency_table, batch=1, threads=1, echo=echo)
    batchnorm = config.search.batchnorm

    def latency(block, in_shape):
        return table.block_latency(block, in_shape, batchnorm=batchnorm)

    return latency, {"latency": "table", "path": config.latency_table, "machine": table.machine}, table


def run_dnas_unit(config: DNASUnitConfig, run: RunDir, *, progress: bool = True, echo: Callable[[str], None] = print,
                  wait: bool = False, dataset=None, callback: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume, or reuse) the search of ``config`` in ``run``; returns its results:
    ``complete``, ``architecture`` (:meth:`Architecture.to_dict`), ``label``, ``history`` (one
    record per epoch: losses, probabilities, Prunode pairs, pruned blocks and layers, expected
    latency, the network derived so far), ``search_seconds`` (wall time of the search, summed
    over resumptions), ``epoch_seconds``, ``threads``, ``expected_latency`` and
    ``predicted_latency`` (seconds, as the search counts them), the latency source, and with
    ``evaluate`` ``supernet_test_acc``. ``callback(record)`` is called after each epoch's
    checkpoint (an exception there interrupts the unit, which then resumes from that epoch)."""
    import torch

    from ..data import InMemoryLoader
    from ..search.dnas import DNAS
    from ..search.space import InputShape
    from ..train import load_checkpoint, save_checkpoint
    from .sweep import _Data

    def body(dataset) -> dict:
        data = _Data(config, dataset)
        images, labels = data.dataset.train_images, data.dataset.train_labels
        if images.shape[-1] != images.shape[-2]:
            raise ConfigError(f"DNAS searches square images; {config.data.dataset} has {tuple(images.shape[-2:])}")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(derive_seed(config.seed, "dnas", "split")))
        if config.subset is not None:
            order = order[:config.subset]
        n_arch = int(round(len(order) * config.arch_fraction))
        if n_arch < 1 or n_arch >= len(order):
            raise ConfigError(f"arch_fraction={config.arch_fraction:g} of {len(order)} training images leaves no images for "
                              "the weights or the architecture; use a fraction nearer 0.2 or more images")
        arch_idx, weight_idx = order[:n_arch], order[n_arch:]
        weights = data.train(derive_seed(config.seed, "dnas", "weights"), subset=weight_idx)
        arch = InMemoryLoader(images[arch_idx], labels[arch_idx], config.arch_batch_size or config.data.batch_size,
                              shuffle=True, transform=data.transform, device=data.device,
                              seed=derive_seed(config.seed, "dnas", "arch"))
        shape = InputShape(int(images.shape[1]), int(images.shape[-1]), int(data.dataset.num_classes))
        latency, source, table = _latency_function(config, echo)
        # measured latencies are written to the shared table once per epoch, not once each
        saving = table.deferred_saves if table is not None else _nothing
        with saving():
            search = DNAS(config.search, shape, latency, seed=derive_seed(config.seed, "dnas", "search"), device=data.device)
        checkpoint = run.checkpoint("search")
        seconds, epoch_seconds = 0.0, []
        if checkpoint.is_file():
            state = load_checkpoint(checkpoint)
            search.load_state_dict(state["dnas"])
            weights.load_state_dict(state["weights"])
            arch.load_state_dict(state["arch"])
            seconds, epoch_seconds = float(state["seconds"]), list(state["epoch_seconds"])
            echo(f"resumed the DNAS search at epoch {search.epoch}/{config.search.epochs}")
        while not search.finished:
            start = time.perf_counter()
            batches = weights
            if progress:
                from tqdm import tqdm

                batches = tqdm(weights, desc=f"dnas epoch {search.epoch + 1}/{config.search.epochs}", leave=False,
                               dynamic_ncols=True)
            with saving():
                record = search.train_epoch(batches, arch)
            epoch_seconds.append(time.perf_counter() - start)
            seconds += epoch_seconds[-1]
            save_checkpoint(checkpoint, {"dnas": search.state_dict(), "weights": weights.state_dict(),
                                         "arch": arch.state_dict(), "seconds": seconds, "epoch_seconds": epoch_seconds})
            run.log({"phase": "search", "epoch": record["epoch"], "loss": record["loss"], "train_acc": record["train_acc"],
                     "arch_loss": record["arch_loss"], "expected_latency": record["expected_latency"],
                     "derived": record["derived"], "seconds": epoch_seconds[-1]})
            echo(f"dnas epoch {record['epoch']}/{config.search.epochs}: loss {record['loss']:.3f}, derived "
                 f"{record['derived']}, expected latency {1e3 * record['expected_latency']:.3f} ms"
                 + (f", pruned {len(record['pruned_blocks'])} block(s) and {len(record['pruned_layers'])} layer(s)"
                    if record["pruned_blocks"] or record["pruned_layers"] else ""))
            if callback is not None:
                callback(record)
        derived = search.derive()
        results = {
            "complete": True, "architecture": derived.to_dict(), "label": derived.label, "history": search.history,
            "search_seconds": seconds, "epoch_seconds": epoch_seconds, "threads": torch.get_num_threads(),
            "expected_latency": float(search.expected_latency().detach()),
            "predicted_latency": search.predicted_latency(derived), "latency_source": source,
            "shape": {"channels": shape.channels, "size": shape.size, "classes": shape.classes},
        }
        if config.evaluate:
            results["supernet_test_acc"] = search.evaluate(data.test)
        run.write_results(results)
        return results

    if dataset is None:
        from .runner import cached_dataset

        dataset = cached_dataset(config.data.dataset, config.data.root)
    return execute(run, config, body, echo=echo, dataset=dataset, wait=wait)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
