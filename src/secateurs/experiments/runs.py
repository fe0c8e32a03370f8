"""Run directories: one per config, named ``<name>-<hash of the non-default config>``.

Re-running the same config finds the same directory and resumes or reuses it; a different
config gets a different directory, so nothing is ever overwritten. Every file is written
atomically (temp file + rename) or appended line by line.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write_text as _atomic_write
from ..errors import CheckpointError, ConfigError
from .config import ExperimentConfig, HashedConfig, _diff


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically. Under torchrun (:mod:`secateurs.distributed`) a
    collective: rank 0 writes, every rank returns once it has."""
    from .. import distributed

    distributed.on_main(_atomic_write, path, text)


def check_runs_root(runs_root: str | Path) -> None:
    """``--runs-dir`` must be a directory (made if missing) that this process can write."""
    root = Path(runs_root)
    for parent in (root, *root.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--runs-dir {root}: {parent} is a file, not a directory; pass a directory (default: runs)")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"--runs-dir {root}: {parent} is not writable by this user; pass a directory you can write")
            return


class RunDir:
    """The files of one run: ``config.yaml``, ``metrics.jsonl``, ``results.json``,
    ``checkpoints/``, plots."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def for_config(cls, config: HashedConfig, runs_root: str | Path = "runs") -> "RunDir":
        check_runs_root(runs_root)
        return cls(Path(runs_root) / config.run_name())

    config_path = property(lambda self: self.path / "config.yaml")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    results_path = property(lambda self: self.path / "results.json")
    checkpoints = property(lambda self: self.path / "checkpoints")

    def checkpoint(self, phase: str) -> Path:
        return self.checkpoints / f"{phase}.pt"

    def saved_config(self) -> dict | None:
        if not self.config_path.is_file():
            return None
        try:
            saved = yaml.safe_load(self.config_path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{self.config_path} is corrupted ({type(e).__name__}); it names the config this run belongs to. "
                "Restore it, or delete the run directory to start over"
            ) from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{self.config_path} does not hold a config mapping; restore it or delete the run directory")
        return saved

    def changes(self, config: HashedConfig) -> list[str]:
        """The dotted keys in which ``config`` differs from the run saved here (none if the
        directory holds no run yet); options added since it was written count as defaults."""
        saved = self.saved_config()
        if saved is None:
            return []
        saved, mine = _with_defaults(saved, type(config)), config.to_dict()
        for key, section in saved.items():
            # written while a phase's unset health read as "error", which meant what unset
            # (None: the command's default) means now
            theirs = mine.get(key)
            if isinstance(section, dict) and section.get("health") == "error" and isinstance(theirs, dict) \
                    and "health" in theirs and theirs["health"] is None:
                section["health"] = None
        return sorted(_flat_keys(_diff(mine, saved)) | _flat_keys(_diff(saved, mine)))

    def bind(self, config: HashedConfig) -> None:
        """Claim the directory for ``config``; refuse if it holds a run of another config."""
        saved = self.saved_config()
        changed = self.changes(config)
        if changed:
            raise ConfigError(
                f"{self.path} holds a run of a different config (changed: {', '.join(changed[:8])}); "
                "resume it with its own config (secateurs train --resume DIR without --config), "
                "or run the new config into its own directory"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        if saved is None:
            atomic_write_text(self.config_path, yaml.safe_dump(config.to_dict(), sort_keys=False))

    @contextlib.contextmanager
    def lock(self, wait: bool = False):
        """Hold the directory exclusively: two processes resuming one run would race on its
        checkpoints. ``flock`` is released by the kernel if the holder dies, so a killed run
        never leaves a stale lock. A busy directory raises :class:`RunBusyError`, or with
        ``wait`` blocks until its holder is done. Under torchrun rank 0 holds it for the job, and
        its failure to get it is raised on every rank."""
        from .. import distributed

        with distributed.main_context(lambda: self._lock(wait)):
            yield self

    @contextlib.contextmanager
    def _lock(self, wait: bool):
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise RunBusyError(
                    f"{self.path} is in use by another secateurs process (pid {holder}); "
                    "wait for it to finish or stop it, then re-run to resume"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` (under torchrun: rank 0 does, as a collective)."""
        from .. import distributed

        distributed.on_main(self._append, record)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def metrics(self) -> list[dict]:
        """Logged records; a record repeated after a resume replaces the earlier one."""
        if not self.metrics_path.is_file():
            return []
        records: dict[tuple, dict] = {}
        for line in self.metrics_path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
            records[(rec.get("phase"), rec.get("epoch"))] = rec
        return list(records.values())

    def results(self) -> dict:
        if not self.results_path.is_file():
            return {"complete": False, "levels": []}
        try:
            return json.loads(self.results_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.results_path} is corrupted ({e}); delete it to recompute") from None

    def write_results(self, results: dict) -> None:
        atomic_write_text(self.results_path, json.dumps(results, indent=2))


#: How :func:`execute` says a run was already finished (the runner counts it as reused).
REUSED = "reusing finished run"


class RunBusyError(ConfigError):
    """The run directory is held by another process (another driver or worker on the same
    run); the runner defers such a unit and waits for it at the end instead of training it twice."""


def execute(run: RunDir, config, body, *, echo=print, dataset=None, wait: bool = False) -> dict:
    """The common frame of every experiment kind: reuse a finished run; otherwise claim the
    directory for ``config`` (refusing another config's run), load the data and call
    ``body(dataset)`` while holding the directory's lock (``wait``: for as long as another
    process holds it; the run is then checked again, since that process may have finished it).
    Bad model names fail before the directory is created (configs that build their own models
    have no ``model`` section)."""
    from ..data import load_dataset
    from ..models import MODELS
    from .config import check_device

    check_device(getattr(config, "device", "auto"))
    if getattr(config, "model", None) is not None:
        MODELS.get(config.model.name)
    if run.results_path.is_file() and run.results().get("complete"):
        run.bind(config)
        echo(f"{REUSED} {run.path}")
        return run.results()
    dataset = dataset if dataset is not None else load_dataset(config.data.dataset, config.data.root)
    run.bind(config)
    with run.lock(wait=wait):
        if run.results_path.is_file() and run.results().get("complete"):
            echo(f"{REUSED} {run.path}")  # finished by the process that held it
            return run.results()
        return body(dataset)


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flat_keys(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def _with_defaults(saved: dict, kind: type = ExperimentConfig) -> dict:
    """A saved config as the current code reads it: options added since it was written take
    their defaults, so a new option never orphans an existing run (as the hash promises)."""
    from ..typed_config import from_dict

    try:
        return from_dict(kind, saved).to_dict()
    except ConfigError:
        return saved  # not readable any more: compare as written, the error names the keys
