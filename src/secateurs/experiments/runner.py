"""Procedures of units, run by executors.

A procedure (a comparison, the seeds of a lottery study, ...) declares its **units**: each one
hashable piece of work, a config whose hash names its run directory plus the function that
runs it. :func:`run_units` does the rest, the same way for every procedure:

- **skip-if-done**: a unit whose run directory holds finished results is reused, not resubmitted;
- **locking**: a unit runs while holding its directory's lock; one held by another process
  (a second driver on the same comparison, or a worker still on it) is deferred and waited for
  at the end, then read, so no unit is ever trained twice;
- **resume**: units checkpoint as they go (every epoch), so a unit that was interrupted, or
  whose worker was killed and retried, goes on from its last checkpoint;
- **partial results**: a unit that fails is reported with its key and message; the others go
  on, and the procedure's report aggregates whatever finished.

Executors (``--executor``): ``local`` (in this process, one unit after another),
``processes:N`` (a pool of N processes on this machine) and ``ray`` / ``ray:ADDRESS`` (each
unit a Ray task with the CPUs/GPUs it declares, on a run directory shared by all workers;
``pip install 'secateurs[ray]'``). Every executor computes the same thing: a unit's result
depends only on its config (its seeds are derived from it), so the aggregated table is the same
bit for bit whichever ran it (as long as each unit gets the same number of threads; see
:class:`Unit`).
"""
from __future__ import annotations

import functools
import inspect
import os
import socket
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..errors import ConfigError, NonFiniteLossError
from .runs import REUSED, RunBusyError, RunDir, check_runs_root


@dataclass(frozen=True)
class Unit:
    """One piece of work: ``fn(config, run_dir, progress=, echo=, wait=, **kwargs)`` returns
    the unit's results dict and leaves them (and its checkpoints) in ``run_dir``, the directory
    named by ``config``'s hash. ``fn`` must be a module-level function (workers import it).

    ``threads``: the torch intra-op threads the unit runs with under every executor (``None``:
    the runner's ``threads``, else the executor's share of the machine: all of it for
    ``local``, cores / N for ``processes:N``, ``cpus`` under Ray). A unit's result is
    deterministic for a given thread count, but float reductions can differ between thread
    counts: to compare executors bit for bit, give them the same threads."""

    key: str
    config: Any
    fn: Callable[..., dict]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    cpus: int = 1
    gpus: float = 0.0
    threads: int | None = None


@dataclass
class Outcome:
    """What became of one unit: ``finished`` (ran now), ``reused`` (was already done),
    ``failed`` / ``diverged`` (with ``error``), or ``busy`` (another process holds it)."""

    key: str
    path: str
    status: str
    results: dict | None = None
    error: str | None = None
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)
    pid: int | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("finished", "reused")


def run_unit(unit: Unit, runs_dir: str, progress: bool, wait: bool, threads: int | None = None,
             echo: Callable[[str], None] | None = None) -> Outcome:
    """Run one unit here (in a driver or a worker) and describe what happened; a failure is
    reported in the outcome, never raised, so the other units go on (an interrupt is raised)."""
    import torch

    run = RunDir.for_config(unit.config, runs_dir)
    messages: list[str] = []

    def say(message: str) -> None:
        messages.append(message)
        if echo is not None:
            echo(message)

    start = time.perf_counter()
    outcome = Outcome(unit.key, str(run.path), "finished", pid=os.getpid(), messages=messages)
    previous = torch.get_num_threads()
    wanted = unit.threads or threads
    if wanted:
        torch.set_num_threads(wanted)
    try:
        kwargs = dict(unit.kwargs)
        data = getattr(unit.config, "data", None)
        if "dataset" in inspect.signature(unit.fn).parameters and "dataset" not in kwargs and data is not None:
            kwargs["dataset"] = cached_dataset(data.dataset, data.root)
        outcome.results = unit.fn(unit.config, run, progress=progress, echo=say, wait=wait, **kwargs)
        if any(m.startswith(REUSED) for m in messages):
            outcome.status = "reused"
    except RunBusyError:
        outcome.status = "busy"
    except NonFiniteLossError as e:
        outcome.status, outcome.error = "diverged", str(e)
    except Exception as e:  # noqa: BLE001 - a unit's failure is a result; the others go on
        outcome.status = "failed"
        where = traceback.extract_tb(e.__traceback__)[-1]
        outcome.error = f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"
    finally:
        if wanted:
            torch.set_num_threads(previous)
    outcome.seconds = time.perf_counter() - start
    return outcome


# -- executors -------------------------------------------------------------------------------------
class Executor:
    """Runs units and yields their outcomes as they finish."""

    name = "executor"

    def map(self, units: Sequence[Unit], runs_dir: str, progress: bool, wait: bool) -> Iterator[Outcome]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalExecutor(Executor):
    """One unit after another in this process (progress bars and messages as they happen)."""

    name = "local"

    def __init__(self, echo: Callable[[str], None] = print, threads: int | None = None):
        self.echo, self.threads = echo, threads

    def map(self, units, runs_dir, progress, wait):
        for unit in units:
            yield run_unit(unit, runs_dir, progress, wait, self.threads, echo=self.echo)


def _share(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


class ProcessExecutor(Executor):
    """A pool of ``workers`` processes on this machine, each with its share of the cores as
    torch threads. A worker that dies (killed, out of memory) breaks the pool; the units it was
    running are resubmitted to a new pool, up to ``retries`` times, and resume from their
    checkpoints."""

    def __init__(self, workers: int, retries: int = 2, threads: int | None = None):
        if workers < 1:
            raise ConfigError(f"--executor processes:{workers}: the pool needs at least 1 process")
        self.workers, self.retries, self.threads = workers, retries, threads
        self.name = f"processes:{workers}"

    def map(self, units, runs_dir, progress, wait):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        pending = list(units)
        breaks = 0
        while pending:
            # spawn, not fork: a forked torch (threads, OpenMP state) can deadlock
            with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                threads = self.threads or _share(self.workers)
                futures = {pool.submit(run_unit, u, runs_dir, False, wait, threads): u for u in pending}
                broken: list[Unit] = []
                for future in as_completed(futures):
                    try:
                        outcome = future.result()
                    except BrokenProcessPool:
                        broken.append(futures[future])
                        continue
                    pending.remove(futures[future])
                    yield outcome
            if broken:
                breaks += 1
                if breaks > self.retries:
                    for unit in broken:
                        yield Outcome(unit.key, str(RunDir.for_config(unit.config, runs_dir).path), "failed",
                                      error=f"its worker process died {breaks} times (killed, or out of memory)")
                    return
                pending = broken


class RayExecutor(Executor):
    """Each unit a Ray task with the CPUs/GPUs it declares; a worker that dies mid-unit is
    retried by Ray (``retries`` times) and the unit resumes from its last checkpoint. The run
    directory must be on storage every node sees (checked before anything starts). Ray is an
    optional extra: ``pip install 'secateurs[ray]'``."""

    def __init__(self, address: str | None = None, retries: int = 3, connect_timeout: float = 3.0,
                 threads: int | None = None):
        self.address, self.retries, self.connect_timeout = address, retries, connect_timeout
        self.threads = threads
        self.name = "ray" if address is None else f"ray:{address}"
        self._started = False

    def start(self, runs_dir: str) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray, an optional extra: pip install 'secateurs[ray]'") from None
        if self.address is not None:
            _check_reachable(self.address, self.connect_timeout)
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError) as e:
                raise ConfigError(f"--executor {self.name}: could not join the Ray cluster: {e}") from None
            self._started = True
        check_shared_storage(runs_dir, _ray_probe)

    def map(self, units, runs_dir, progress, wait):
        import ray

        remote = ray.remote(run_unit)
        refs = {}
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        gpus_of = {unit.key: unit.gpus or _wants_gpu(unit, cluster_gpus, self.name) for unit in units}  # all checked first
        for unit in units:
            gpus = gpus_of[unit.key]
            task = remote.options(num_cpus=unit.cpus, num_gpus=gpus, max_retries=self.retries,
                                  retry_exceptions=False, name=f"secateurs:{unit.key}")
            refs[task.remote(unit, runs_dir, False, wait, self.threads or unit.cpus)] = unit
        remaining = list(refs)
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1)
            try:
                yield ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - retries exhausted (the worker kept dying)
                unit = refs[done[0]]
                yield Outcome(unit.key, str(RunDir.for_config(unit.config, runs_dir).path), "failed",
                              error=f"Ray gave up after {self.retries} retries: {type(e).__name__}: {e}")

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _wants_gpu(unit: Unit, cluster_gpus: float, name: str) -> float:
    """The GPU a unit gets under Ray when it declares none: Ray hides GPUs from tasks that do
    not ask for one, so a unit whose config trains on ``cuda`` (or ``auto``, on a cluster with
    GPUs) asks for one; ``cuda`` on a cluster without GPUs is refused before anything runs,
    never quietly trained on a CPU."""
    device = str(getattr(unit.config, "device", "cpu"))
    if device.startswith("cuda") and not cluster_gpus:
        raise ConfigError(f"unit {unit.key!r} trains on {device} but the Ray cluster ({name}) has no GPU; "
                          "set device: auto or cpu, or add GPU nodes")
    return 1.0 if cluster_gpus and (device == "auto" or device.startswith("cuda")) else 0.0


def _check_reachable(address: str, timeout: float) -> None:
    """A Ray address that does not answer fails here within ``timeout`` seconds, before
    ``ray.init`` (which would wait far longer) and before any run directory is touched."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--executor ray:{address}: give the head node as HOST:PORT (e.g. ray:10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or type(e).__name__)
        raise ConfigError(
            f"--executor ray:{address}: nothing answers at {host}:{port} ({reason} within {timeout:g} s); "
            "start the head node there (ray start --head --port PORT) or fix the address. Nothing was started"
        ) from None


def check_shared_storage(runs_dir: str, probe: Callable[[str], dict[str, bool]]) -> None:
    """Every worker node must see the run directory the driver writes: a token file is written
    there and ``probe(path)`` reports, per node, whether that node can read it."""
    token = Path(runs_dir) / f".secateurs-shared-{uuid.uuid4().hex}"
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text("secateurs")
    try:
        seen = probe(str(token))
    finally:
        token.unlink(missing_ok=True)
    blind = sorted(node for node, ok in seen.items() if not ok)
    if blind:
        raise ConfigError(
            f"the run directory {runs_dir} is not on storage shared by all Ray workers: node(s) {', '.join(blind)} "
            "cannot see it. Put --runs-dir on a filesystem every node mounts at the same path (NFS, a cluster volume)"
        )


def _read_token(path: str) -> bool:
    return Path(path).is_file() and Path(path).read_text() == "secateurs"


def _ray_probe(path: str) -> dict[str, bool]:
    """Read the token on every alive node (a task pinned to each)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    read = ray.remote(num_cpus=0)(_read_token)
    refs = {n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": read.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path) for n in nodes}
    return {name: bool(ray.get(ref)) for name, ref in refs.items()}


EXECUTORS = ("local", "processes:N", "ray", "ray:ADDRESS")


def make_executor(spec: str, echo: Callable[[str], None] = print, threads: int | None = None) -> Executor:
    """``local``, ``processes:N``, ``ray`` (a Ray instance started for this run, or the one
    ``RAY_ADDRESS`` names) or ``ray:HOST:PORT`` (join that cluster); ``threads``: torch threads
    per unit (default: the executor's share of the machine)."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"--threads {threads!r}: give a positive number of torch threads per unit")
    name, _, arg = spec.partition(":")
    if name == "local" and not arg:
        return LocalExecutor(echo, threads)
    if name == "processes":
        if not arg.isdigit() or int(arg) < 1:
            raise ConfigError(f"--executor {spec}: give the number of processes, e.g. processes:2")
        return ProcessExecutor(int(arg), threads=threads)
    if name == "ray":
        return RayExecutor(arg or None, threads=threads)
    raise ConfigError(f"unknown --executor {spec!r}; known: {', '.join(EXECUTORS)}")


# -- the runner ------------------------------------------------------------------------------------
def run_units(
    units: Sequence[Unit], runs_dir: str | Path, executor: str | Executor = "local", *,
    progress: bool = True, echo: Callable[[str], None] = print, threads: int | None = None,
) -> list[Outcome]:
    """Run every unit that is not finished yet on ``executor``; returns one outcome per unit,
    in the units' order. See the module docstring for what is shared by every procedure."""
    from tqdm import tqdm

    keys = [u.key for u in units]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"unit keys must be unique, got duplicates: {sorted({k for k in keys if keys.count(k) > 1})}")
    for unit in units:
        params = inspect.signature(unit.fn).parameters
        if "wait" not in params or not callable(unit.fn):
            raise ConfigError(f"unit {unit.key!r}: its function must accept (config, run, progress=, echo=, wait=)")
    check_runs_root(runs_dir)
    runs_dir = str(Path(runs_dir).resolve())
    paths = {}
    for unit in units:
        path = RunDir.for_config(unit.config, runs_dir).path
        if path in paths:
            raise ConfigError(f"units {paths[path]!r} and {unit.key!r} have the same config (run directory {path})")
        paths[path] = unit.key
    ex = make_executor(executor, echo, threads) if isinstance(executor, str) else executor
    outcomes: dict[str, Outcome] = {}
    todo = []
    for unit in units:  # skip-if-done without submitting anything
        run = RunDir.for_config(unit.config, runs_dir)
        if run.results_path.is_file() and run.results().get("complete"):
            run.bind(unit.config)  # a finished run of another config under this name is refused
            outcomes[unit.key] = Outcome(unit.key, str(run.path), "reused", results=run.results())
            echo(_describe(outcomes[unit.key], len(outcomes), len(units)))
        else:
            todo.append(unit)
    if todo and isinstance(ex, RayExecutor):
        ex.start(runs_dir)
    local = isinstance(ex, LocalExecutor)
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=f"units ({ex.name})",
               disable=not progress or local, dynamic_ncols=True)
    try:
        with bar:
            for wait in (False, True):  # busy units: once everything else is done, wait for them
                done = 0
                for outcome in ex.map(todo, runs_dir, progress and local, wait):
                    done += 1
                    outcomes[outcome.key] = outcome
                    bar.update(outcome.status != "busy")
                    if not local:
                        for message in outcome.messages:
                            echo(f"  {outcome.key}: {message}")
                    echo(_describe(outcome, len([o for o in outcomes.values() if o.status != "busy"]), len(units)))
                todo = [u for u in todo if outcomes[u.key].status == "busy"]
                if not todo:
                    break
                echo(f"{len(todo)} unit(s) held by another process; waiting for them: {', '.join(u.key for u in todo)}")
    finally:
        ex.close()
    return [outcomes[u.key] for u in units]


def _describe(o: Outcome, n: int, total: int) -> str:
    what = {"finished": f"finished in {o.seconds:.1f} s", "reused": REUSED,
            "busy": "held by another process, deferred"}.get(o.status, f"{o.status}, continuing with the other units: {o.error}")
    return f"[{n}/{total}] {o.key}: {what} ({o.path})"


def failures(outcomes: Sequence[Outcome]) -> list[dict]:
    """The units that did not finish, with their keys and messages, for a report."""
    return [{"unit": o.key, "status": o.status, "error": o.error, "run": o.path} for o in outcomes if not o.ok]


@functools.lru_cache(maxsize=4)
def cached_dataset(name: str, root: str | None):
    """One copy of a dataset per process, shared by the units it runs (read-only)."""
    from ..data import load_dataset

    return load_dataset(name, root)
