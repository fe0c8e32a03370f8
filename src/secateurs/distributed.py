"""Several processes (``torchrun``): the process group, and which rank does what.

``torchrun --nproc_per_node N -m secateurs train ...`` starts N processes whose environment
holds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. The CLI
calls :func:`init` once at start (backend ``gloo`` on a CPU host; on a CUDA host ``nccl`` for
CUDA tensors and ``gloo`` for CPU ones, each rank on GPU ``LOCAL_RANK``) and :func:`teardown`
at the end. Between the two, :func:`is_distributed` is true and:

- every :class:`~secateurs.train.Trainer` trains data-parallel (DistributedDataParallel, each
  rank on its slice of every global batch; see ``Trainer._shard``);
- file writes (run directory files, checkpoints) are *collective*: every rank calls them at the
  same point of the program, rank 0 alone writes, and every rank leaves only once it has
  (:func:`on_main`). So reads before a write see the old files on every rank and reads after
  it see the new ones, e.g. the phase checkpoint the next phase loads.

A process group that other code created (``torch.distributed.init_process_group`` in a user's
script) is left alone: it does not make :func:`is_distributed` true, so a script that wraps its
own model in DDP keeps full control. Calling :func:`init` in such a script adopts its group.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from typing import Any, Callable, ContextManager

import torch

from .errors import ConfigError

_active = False  # init() has run (and teardown() has not)
_owned = False  # init() created the group, so teardown() destroys it
_alone = False  # rank 0 is inside on_main's fn: collective writes in it are plain writes


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): how many processes torchrun started."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(
            f"WORLD_SIZE={value!r} in the environment is not a whole number; unset it, or start several "
            "processes with torchrun --nproc_per_node N -m secateurs ..."
        ) from None
    if n < 1:
        raise ConfigError(f"WORLD_SIZE={n} in the environment must be at least 1; unset it or use torchrun")
    return n


def env_rank() -> int:
    """``RANK`` from the environment (0 when unset); readable before :func:`init`."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def local_rank() -> int:
    """``LOCAL_RANK``: this process's index on its machine (its GPU); 0 when unset."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def init() -> bool:
    """Join the process group the environment describes when ``WORLD_SIZE`` > 1 (as torchrun
    sets it); returns :func:`is_distributed`. Without it, a no-op returning False."""
    global _active, _owned
    world = env_world_size()
    if world <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError(
            f"WORLD_SIZE={world} but this PyTorch build has no torch.distributed; "
            "run one process (python -m secateurs ...) or install a PyTorch with distributed support"
        )
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE={world} but {', '.join(missing)} not set; start the processes with "
                "torchrun --nproc_per_node N -m secateurs ..., which sets them"
            )
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())  # "cuda" / "auto" then mean this rank's GPU
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
        _owned = True
    _active = True
    return is_distributed()


def teardown() -> None:
    """Leave the group :func:`init` joined (destroying it if :func:`init` created it)."""
    global _active, _owned
    if _owned:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _active = _owned = False


@contextlib.contextmanager
def session():
    """:func:`init` on entry, :func:`teardown` on exit (also on errors). On a normal exit the
    ranks first meet at a barrier and drop what still refers to the group (a Trainer's DDP
    wrapper), so no rank tears its connections down while another still uses them."""
    try:
        init()
        yield is_distributed()
        if is_distributed():
            import gc

            gc.collect()
            barrier()
    finally:
        teardown()


def is_distributed() -> bool:
    """True between :func:`init` and :func:`teardown` when the group has more than one process."""
    if not _active:
        return False
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    if not is_distributed():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def world_size() -> int:
    """How many processes train together (1 when not distributed)."""
    if not is_distributed():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and prints (True when not distributed)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (a no-op when not distributed)."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def check_batch_size(batch_size: int | None, name: str = "the training batch size") -> None:
    """Refuse a global batch smaller than the number of processes: a rank would get no examples.
    (A batch size below 1 is left to the data's own check, which names it.)"""
    world = world_size()
    if isinstance(batch_size, int) and 1 <= batch_size < world:
        raise ConfigError(
            f"{name} is {batch_size}, smaller than the {world} processes training together "
            f"(WORLD_SIZE={world}): each process trains on a slice of every batch and needs at least one example. "
            f"Raise it to at least {world}, or start at most {batch_size} process(es) (torchrun --nproc_per_node {batch_size})"
        )


def raised_on_main(error: BaseException) -> bool:
    """Whether ``error`` was raised on rank 0 and re-raised here by :func:`on_main`."""
    return getattr(error, "_secateurs_from_main", False)


def _share_outcome(error: BaseException | None) -> None:
    """Rank 0's outcome of a collective write, raised on every rank (after every rank has it)."""
    import torch.distributed as dist

    box: list[Any] = [None]
    if is_main() and error is not None:
        try:
            pickle.dumps(error)
            box[0] = error
        except Exception:  # an exception that cannot travel: its type and message do
            box[0] = RuntimeError(f"{type(error).__name__}: {error}")
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return
    if is_main():
        raise error
    shared = box[0]
    shared._secateurs_from_main = True
    raise shared


def on_main(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Call ``fn`` on rank 0 only, as a collective: every rank must call this at the same point.
    All ranks enter (so what they read before happened before ``fn`` changes anything), rank 0
    calls ``fn``, and all leave once it returned; an exception in it is raised on every rank.
    Returns ``fn``'s result on rank 0, None elsewhere. Not distributed, or called from within
    another ``on_main`` (which only rank 0 runs): just ``fn(...)``."""
    global _alone
    if _alone or not is_distributed():
        return fn(*args, **kwargs)
    barrier()
    result, error = None, None
    if is_main():
        _alone = True
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            error = e
        finally:
            _alone = False
    _share_outcome(error)
    return result


@contextlib.contextmanager
def main_context(factory: Callable[[], ContextManager]):
    """Enter ``factory()`` on rank 0 only (e.g. a run directory's lock), as a collective: an
    error entering it is raised on every rank. Not distributed: just ``with factory()``."""
    if not is_distributed():
        with factory() as value:
            yield value
        return
    with contextlib.ExitStack() as stack:
        error = None
        if is_main():
            try:
                stack.enter_context(factory())
            except Exception as e:
                error = e
        _share_outcome(error)
        yield None
