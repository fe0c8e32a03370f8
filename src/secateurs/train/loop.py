"""The training loop: epochs of steps, evaluation, checkpoints and exact resume.

The per-step path does no host synchronisation: losses and accuracy stay on the device
and are read back only every ``loss_check_every`` steps and at epoch end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..errors import CheckpointError, ConfigError, NonFiniteLossError, TrainingHealthError
from .checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    check_format,
    check_model_compatible,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig
from .optim import build_lr_schedule, build_optimizer


@runtime_checkable
class SparsifierLike(Protocol):
    """What the loop needs from a sparsifier: ``step()`` right after every optimizer step."""

    def step(self) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class BatchSource(Protocol):
    """One epoch of on-device ``(x, y)`` batches per iteration, with a resumable RNG."""

    def __iter__(self): ...
    def __len__(self) -> int: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclasses.dataclass
class TrainState:
    """Progress counters: epochs and optimizer steps completed."""

    epoch: int = 0
    step: int = 0


def resolve_device(name: str) -> torch.device:
    """``"auto"`` means CUDA when present; an explicit CUDA request on a CPU host is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"TrainConfig.device={name!r} but CUDA is not available; use device='auto' or 'cpu'")
    return device


def _missing_methods(obj: Any, names: Sequence[str]) -> list[str]:
    return [n for n in names if not callable(getattr(obj, n, None))]


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Iterable, *, device: torch.device | None = None, autocast=contextlib.nullcontext
) -> dict:
    """Mean cross-entropy and accuracy of ``model`` over ``(x, y)`` batches, in eval mode (the
    model's mode is restored); one host sync at the end. ``majority`` is the accuracy of always
    predicting the most common class of these labels: the chance level to beat."""
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    labels = None
    try:
        for x, y in data:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with autocast():
                logits = model(x)
                loss_sum += F.cross_entropy(logits, y, reduction="sum").float()
            correct += (logits.argmax(dim=1) == y).sum()
            if labels is None:
                labels = torch.zeros(logits.shape[1], dtype=torch.long, device=device)
            labels.index_add_(0, y, torch.ones_like(y))
            count += y.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        return {"loss": float("nan"), "acc": float("nan"), "majority": float("nan")}
    loss, acc, top = torch.stack([loss_sum / count, correct.float(), labels.max().float()]).tolist()
    return {"loss": loss, "acc": acc / count, "majority": top / count}


#: ``loss_fn(model, logits, y) -> loss``: the scalar a training step minimises.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class _GradShare:
    """The comm hook's state: this rank's share of the current global batch."""

    weight = 1.0


def _weighted_allreduce(state: _GradShare, bucket):
    """DDP comm hook: the sum over ranks of each rank's gradient times its batch share, i.e.
    the gradient of the mean loss over the global batch (DDP's default averages the ranks'
    gradients, which is that only when every rank has as many examples)."""
    import torch.distributed as dist

    buffer = bucket.buffer()
    buffer.mul_(state.weight)
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


class Trainer:
    """Trains ``model`` on ``train_data`` per ``cfg``; see :meth:`fit` and :meth:`resume`.

    Hooks for a training procedure that is more than cross-entropy on the weights (e.g. SNL's
    search in ``secateurs.experiments.linearize``), all optional and all saved and restored
    with the checkpoint:

    - ``loss_fn(model, logits, y)``: the loss a step minimises (default: cross-entropy with
      ``cfg.label_smoothing``), computed under the same autocast; it is also the loss the
      non-finite check, the progress bar and ``train_loss`` see. Return a tensor (no
      ``.item()``: that would sync the host every step).
    - ``extra_optimizers``: more optimizers (other parameters, other rules) zeroed and stepped
      with the main one, in order, after it; ``cfg.grad_clip`` covers their parameters too,
      ``cfg.lr_schedule`` only the main optimizer.
    - ``after_step``: ``hook(trainer)`` right after the optimizers' steps, before the
      sparsifier's (which has the last word on weights): projections such as clamping.
    - ``step_callbacks``: ``callback(trainer)`` after each step's bookkeeping; one may call
      :meth:`stop` to end training there.
    - ``extra_state``: named objects with ``state_dict()`` / ``load_state_dict()`` (a schedule
      the hooks update, say) kept in the checkpoint under ``"extra_state"``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: BatchSource,
        cfg: TrainConfig,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        sparsifier: SparsifierLike | None = None,
        eval_data: Iterable | None = None,
        val_data: Iterable | None = None,
        checkpoint_path: str | Path | None = None,
        callbacks: Sequence[Callable[[dict], None]] = (),
        step_callbacks: Sequence[Callable[["Trainer"], None]] = (),
        start_step: int = 0,
        progress: bool = True,
        progress_desc: str = "train",
        loss_fn: LossFn | None = None,
        extra_optimizers: Sequence[torch.optim.Optimizer] = (),
        after_step: Sequence[Callable[["Trainer"], None]] = (),
        extra_state: Mapping[str, Any] | None = None,
    ) -> None:
        missing = _missing_methods(train_data, ("__iter__", "__len__", "state_dict", "load_state_dict"))
        if missing:
            raise ConfigError(f"train_data lacks {missing}; it must be a batch source (iterable, sized, with state_dict)")
        if sparsifier is not None and _missing_methods(sparsifier, ("step", "state_dict", "load_state_dict")):
            raise ConfigError("sparsifier must have step(), state_dict() and load_state_dict(); see SparsifierLike")
        self._check_hooks(loss_fn, extra_optimizers, after_step, step_callbacks, extra_state)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.eval_data = eval_data
        self.val_data = val_data
        self.sparsifier = sparsifier
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.callbacks = tuple(callbacks)
        self.step_callbacks = tuple(step_callbacks)
        self.progress = progress
        self.progress_desc = progress_desc
        self.optimizer = optimizer if optimizer is not None else build_optimizer(self.model, cfg.optimizer)
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else self._cross_entropy
        self.extra_optimizers = tuple(extra_optimizers)
        self._check_disjoint_optimizers()
        self.after_step = tuple(after_step)
        self.extra_state = dict(extra_state or {})
        self.stopped = False  # set by stop(): training ended before cfg.epochs, for good
        self.steps_per_epoch = len(train_data)
        if self.steps_per_epoch < 1:
            raise ConfigError("train_data yields no batches per epoch; check the dataset and batch size")
        self.lr_schedule = build_lr_schedule(self.optimizer, cfg.lr_schedule, self.steps_per_epoch, cfg.epochs)
        self.state = TrainState()
        self.history: list[dict] = []
        self.evaluations: list[dict] = []
        self.health: str | None = None  # why this phase failed the health check ("mark" mode)
        self._majority: float | None = None
        if start_step:
            self._start_at(start_step)
        self._amp = cfg.amp and self.device.type == "cuda"
        self._autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if self._amp else contextlib.nullcontext
        self._loss_buf = torch.zeros(cfg.loss_check_every, device=self.device)
        self._ddp: nn.Module | None = None  # the DistributedDataParallel wrapper under torchrun (_data_parallel)
        self._grad_share = _GradShare()
        if distributed.is_distributed():
            distributed.check_batch_size(getattr(train_data, "batch_size", None))

    @staticmethod
    def _check_hooks(loss_fn, extra_optimizers, after_step, step_callbacks, extra_state) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError(f"loss_fn must be a callable loss_fn(model, logits, y) -> loss tensor, got {loss_fn!r}")
        for i, opt in enumerate(extra_optimizers):
            missing = _missing_methods(opt, ("zero_grad", "step", "state_dict", "load_state_dict"))
            if missing or not hasattr(opt, "param_groups"):
                raise ConfigError(
                    f"extra_optimizers[{i}] ({type(opt).__name__}) lacks {missing or ['param_groups']}; "
                    "pass torch.optim.Optimizer instances"
                )
        for kind, hooks in (("after_step", after_step), ("step_callbacks", step_callbacks)):
            for i, hook in enumerate(hooks):
                if not callable(hook):
                    raise ConfigError(f"{kind}[{i}] is {hook!r}, not a callable hook(trainer); pass functions")
        if extra_state is not None and not isinstance(extra_state, Mapping):
            raise ConfigError(
                f"extra_state must be a mapping of names to objects with state_dict() / load_state_dict(), "
                f"got {type(extra_state).__name__}"
            )
        for name, obj in (extra_state or {}).items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"extra_state names must be non-empty strings, got {name!r}")
            missing = _missing_methods(obj, ("state_dict", "load_state_dict"))
            if missing:
                raise ConfigError(f"extra_state[{name!r}] ({type(obj).__name__}) lacks {missing}; give it both methods")

    def _check_disjoint_optimizers(self) -> None:
        seen: dict[int, str] = {}
        for label, opt in [("optimizer", self.optimizer)] + [
            (f"extra_optimizers[{i}]", o) for i, o in enumerate(self.extra_optimizers)
        ]:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen and seen[id(p)] != label:
                        raise ConfigError(
                            f"a parameter of shape {tuple(p.shape)} is in both {seen[id(p)]} and {label}, so it would "
                            "be stepped twice per step; give each optimizer its own parameters"
                        )
                    seen[id(p)] = label

    def _cross_entropy(self, model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The default ``loss_fn``: cross-entropy with ``cfg.label_smoothing``."""
        return F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)

    def stop(self) -> None:
        """End training after the current step (call it from a step callback): the epoch is
        closed there (its record, evaluation and checkpoint), :meth:`fit` returns, and a
        trainer resumed from that checkpoint is stopped too (``fit`` trains nothing more)."""
        self.stopped = True

    def _start_at(self, step: int) -> None:
        """Begin mid-schedule, as if ``step`` steps had been taken: the learning rate is the
        schedule's value at ``step`` and training ends at the usual last step. This is how a
        network rewound to iteration k is retrained for the remaining T - k steps (weight
        rewinding, Frankle et al. 2020; learning-rate rewinding, Renda et al. 2020)."""
        total = self.cfg.epochs * self.steps_per_epoch
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= total:
            raise ConfigError(
                f"start_step {step!r} is outside the training run of {total} steps "
                f"({self.cfg.epochs} epochs x {self.steps_per_epoch}); rewind to an iteration within training"
            )
        self.state = TrainState(epoch=step // self.steps_per_epoch, step=step)
        schedule = self.lr_schedule
        schedule.last_epoch = step
        for group, factor, base in zip(self.optimizer.param_groups, schedule.lr_lambdas, schedule.base_lrs):
            group["lr"] = base * factor(step)
        schedule._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # ----------------------------------------------------------------- training
    def fit(self) -> list[dict]:
        """Train until ``cfg.epochs`` are done; returns the records of every completed
        epoch (including those restored by :meth:`resume`)."""
        while self.state.epoch < self.cfg.epochs and not self.stopped:
            start = time.perf_counter()
            record = self._train_epoch()
            if self.eval_data is not None:
                metrics = self.evaluate(self.eval_data)
                record.update(test_loss=metrics["loss"], test_acc=metrics["acc"])
                self._majority = metrics["majority"]
            if self.val_data is not None:
                metrics = self.evaluate(self.val_data)
                record.update(val_loss=metrics["loss"], val_acc=metrics["acc"])
            record["time_s"] = time.perf_counter() - start
            self._check_health(record, last=self.state.epoch == self.cfg.epochs or self.stopped)
            self.history.append(record)
            if self.checkpoint_path is not None:
                save_checkpoint(self.checkpoint_path, self.state_dict())
            for callback in self.callbacks:
                callback(record)
        return list(self.history)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns the detached loss and logits (no host sync)."""
        with self._autocast():
            logits = (self.model if self._ddp is None else self._ddp)(x)
            loss = self.loss_fn(self.model, logits, y)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ConfigError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}; reduce it (e.g. .mean())" if isinstance(loss, torch.Tensor) else "")
            )
        self.optimizer.zero_grad(set_to_none=True)
        for opt in self.extra_optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            if hasattr(self.sparsifier, "mask_grads_"):
                self.sparsifier.mask_grads_()  # clip the sparse network's gradient norm
            # read from the optimizer each time: growing a network replaces its parameters
            params = [p for o in (self.optimizer, *self.extra_optimizers) for g in o.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        for opt in self.extra_optimizers:
            opt.step()
        for hook in self.after_step:
            hook(self)
        if self.sparsifier is not None:
            self.sparsifier.step()
        self.lr_schedule.step()
        return loss.detach(), logits.detach()

    # ------------------------------------------------------------ data parallel
    def _data_parallel(self) -> None:
        """Under torchrun (:func:`secateurs.distributed.is_distributed`), wrap the model in
        DistributedDataParallel for the training forward/backward, once. Everything else
        (evaluation, checkpoints, the sparsifier and its masks) keeps using the unwrapped
        ``self.model``. The gradients are all-reduced as a weighted sum (each rank's weighted
        by its share of the global batch, see :meth:`_shard`), not DDP's plain average."""
        if self._ddp is not None or not distributed.is_distributed():
            return
        from torch.nn.parallel import DistributedDataParallel

        own = {id(p) for p in self.model.parameters()}
        outside = [p for o in self.extra_optimizers for g in o.param_groups for p in g["params"] if id(p) not in own]
        if outside:
            raise ConfigError(
                f"extra_optimizers hold {len(outside)} parameter(s) outside the model; under torchrun only the "
                "model's gradients are all-reduced, so they would drift apart between processes. Make them part "
                "of the model (register them on a submodule), or train in one process"
            )
        self._ddp = DistributedDataParallel(self.model)  # broadcasts rank 0's weights and buffers
        self._ddp.register_comm_hook(self._grad_share, _weighted_allreduce)

    def _shard(self, x: torch.Tensor, y: torch.Tensor, batch: int):
        """This rank's slice of the global batch ``(x, y)``; returns ``(x, y, n, share)``: the
        slice, the number of examples it counts for and its share of the batch, ``n / len(y)``.

        Every rank draws the same global batch (same loader seed); of its ``B`` rows rank ``r``
        of ``W`` takes rows ``floor(r B / W)`` up to ``floor((r + 1) B / W)``: contiguous
        slices whose sizes differ by at most one when ``B`` is not divisible by ``W``. Its
        gradient is weighted by ``share`` in the all-reduce, so the summed gradient is the
        mean over the whole global batch, as in one process on it (up to float rounding),
        provided the loss is a mean over the batch's examples (as the default cross-entropy
        is) plus terms that do not depend on the batch. A batch smaller than ``W`` (only the
        last, partial one of an epoch: smaller batch sizes are refused) leaves some ranks
        without rows; they compute on a copy of its first example with weight 0 (DDP needs
        every rank in every step), which counts for nothing. Not distributed: ``(x, y,
        len(y), 1.0)``.
        """
        total = y.shape[0]
        if self._ddp is None:
            return x, y, total, 1.0
        world, rank = distributed.world_size(), distributed.rank()
        if total < world and batch < self.steps_per_epoch:
            raise ConfigError(
                f"batch {batch} of the training data has {total} examples, fewer than the {world} processes "
                "training together; use a batch size of at least the number of processes"
            )
        start, stop = rank * total // world, (rank + 1) * total // world
        if stop > start:
            n, share = stop - start, (stop - start) / total
        else:
            start, stop, n, share = 0, 1, 0, 0.0
        self._grad_share.weight = share
        return x[start:stop], y[start:stop], n, share

    def _global(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """``values`` summed over the ranks, in one all-reduce (as they are in one process)."""
        if self._ddp is None:
            return list(values)
        import torch.distributed as dist

        flat = torch.cat([v.detach().double().reshape(-1) for v in values])
        dist.all_reduce(flat)
        out, offset = [], 0
        for v in values:
            out.append(flat[offset:offset + v.numel()].reshape(v.shape).to(v.dtype))
            offset += v.numel()
        return out

    def _train_epoch(self) -> dict:
        """One epoch (or what is left of it). Under torchrun each rank trains on its slice of
        every global batch (:meth:`_shard`); the bookkeeping (train loss and accuracy, the
        loss check's window, the health check's first-epoch loss and labels) is summed over
        the ranks whenever it is read, so every rank sees the global values and takes the same
        decisions (a non-finite loss on any rank stops every rank at the same step)."""
        self._data_parallel()
        self.model.train()
        epoch = self.state.epoch + 1
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        count = 0
        pending = 0  # losses in the buffer not yet checked
        # normally a whole epoch; fewer steps when the run started mid-epoch (start_step)
        steps = epoch * self.steps_per_epoch - self.state.step
        # the health check's view of the first epoch: the loss of its second half, and the
        # labels seen (their entropy is the loss of a model that learned only the class prior)
        watch = epoch == 1 and self.cfg.health != "off"
        late_from = steps // 2
        late_sum = torch.zeros((), device=self.device)
        labels = None
        bar = tqdm(
            total=steps, desc=f"{self.progress_desc} {epoch}/{self.cfg.epochs}",
            disable=not (self.progress and distributed.is_main()), leave=False, dynamic_ncols=True,
        )
        with bar:
            for batch, (x, y) in enumerate(self.train_data, start=1):
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                x, y, n, share = self._shard(x, y, batch)
                loss, logits = self._step(x, y)
                self.state.step += 1
                # this rank's share of the step's loss: summed over the ranks, the global batch's
                step_loss = loss if self._ddp is None else loss * share
                self._loss_buf[pending] = step_loss
                pending += 1
                loss_sum += loss.float() * n
                correct += (logits[:n].argmax(dim=1) == y[:n]).sum()
                count += n
                if watch:
                    if batch > late_from:
                        late_sum += step_loss.float()
                    if labels is None:
                        labels = torch.zeros(logits.shape[-1], dtype=torch.long, device=self.device)
                    labels.index_add_(0, y[:n], torch.ones_like(y[:n]))  # bincount would sync on CUDA
                bar.update(1)
                if pending == len(self._loss_buf):
                    self._check_losses(pending, epoch, batch, bar, loss_sum, correct, count)
                    pending = 0
                if self.cfg.eval_every is not None and self.state.step % self.cfg.eval_every == 0:
                    if pending:  # never record an evaluation of a network that has diverged
                        self._check_losses(pending, epoch, batch, bar, loss_sum, correct, count)
                        pending = 0
                    self._evaluate_now()
                for callback in self.step_callbacks:
                    callback(self)
                if batch == steps or self.stopped:
                    break
            if pending:
                self._check_losses(pending, epoch, batch, bar, loss_sum, correct, count)
        if self._ddp is not None:
            loss_sum, correct, late_sum, total = self._global(
                loss_sum, correct, late_sum, torch.tensor(float(count), device=self.device))
            count = int(total.item())
            if labels is not None:
                (labels,) = self._global(labels)
        if count == 0:
            raise ConfigError("train_data yielded no batches this epoch; check the dataset and batch size")
        self.state.epoch = epoch
        record = {
            "epoch": epoch,
            "step": self.state.step,
            "train_loss": (loss_sum / count).item(),
            "train_acc": correct.item() / count,
            "test_loss": None,
            "test_acc": None,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if watch and labels is not None:
            share = labels.double() / labels.sum()
            entropy = -(share[share > 0] * share[share > 0].log()).sum()
            late = batch - late_from
            record["_health"] = {"late_loss": (late_sum / max(late, 1)).item(), "late_steps": late,
                                 "chance_loss": entropy.item()}
        return record

    #: Steps the second half of the first epoch needs before its loss is judged: fewer are too
    #: noisy to call a run stuck (tiny smoke runs are judged by their final accuracy only).
    HEALTH_MIN_STEPS = 10

    def _check_health(self, record: dict, last: bool) -> None:
        """Fail (or mark) a phase that learned nothing. After the first epoch, the mean loss
        of its second half must be below 98% of chance (the entropy of the labels: what a
        model that learned only the class frequencies scores). At the end, the accuracy on
        the evaluation data must beat always predicting its most common class."""
        first = record.pop("_health", None)
        if self.cfg.health == "off" or self.health is not None:
            return
        problem = None
        if first is not None and first["late_steps"] >= self.HEALTH_MIN_STEPS and first["late_loss"] >= 0.98 * first["chance_loss"]:
            problem = (
                f"after epoch 1 the training loss is {first['late_loss']:.4f} (mean of its last {first['late_steps']} steps), "
                f"not below chance ({first['chance_loss']:.4f}, the entropy of the labels): the network is learning nothing"
            )
        elif last and record.get("test_acc") is not None and self.eval_data is not None:
            majority = self._majority
            if majority is not None and record["test_acc"] <= majority + 0.005:
                problem = (
                    f"training ended at test accuracy {100 * record['test_acc']:.2f}%, no better than always predicting "
                    f"the most common class ({100 * majority:.2f}%)"
                )
        if problem is None:
            return
        if self.cfg.health == "mark":
            self.health = problem
            record["health"] = problem
            return
        raise TrainingHealthError(
            f"{self.progress_desc}: {problem}. Likely causes: a learning rate too high for this model "
            f"(optimizer.lr={self.cfg.optimizer.lr}; try {self.cfg.optimizer.lr / 10:g}) or too low, dead ReLUs after "
            "a bad initialisation, or a mask so sparse that no signal gets through. If this is the result you are "
            "measuring (e.g. layer collapse at extreme sparsity), set the phase's health: mark to record it and go on"
        )

    def _check_losses(self, pending: int, epoch: int, batch: int, bar, loss_sum, correct, count: int) -> None:
        """Check the last ``pending`` losses at once (one host sync) and refresh the bar."""
        window = self._loss_buf[:pending]
        if self._ddp is not None:  # every rank checks the global losses, so all stop together
            window, loss_sum, correct, total = self._global(
                window, loss_sum, correct, torch.tensor(float(count), device=self.device))
            count = int(total.item())
        finite = torch.isfinite(window)
        ok, mean_loss, n_correct = torch.stack(
            [finite.all().float(), loss_sum.float(), correct.float()]
        ).tolist()
        if ok:
            if self.progress:
                bar.set_postfix(loss=f"{mean_loss / count:.4f}", acc=f"{n_correct / count:.3f}", refresh=False)
            return
        first = int((~finite).nonzero()[0, 0])
        offset = pending - 1 - first  # steps between the bad one and the current one
        self._raise_non_finite(
            step=self.state.step - offset, epoch=epoch, batch=batch - offset, value=float(window[first])
        )

    def _raise_non_finite(self, *, step: int, epoch: int, batch: int, value: float) -> None:
        path = self.checkpoint_path
        if path is None:
            kept = "no checkpoint path was set, so nothing was saved"
        elif path.is_file():
            kept = f"the last good checkpoint at {str(path)!r} (epoch {self.state.epoch}) is kept and was not overwritten"
        else:
            kept = f"no checkpoint had been written yet at {str(path)!r}"
        raise NonFiniteLossError(
            f"loss became {value} at global step {step} (epoch {epoch}, batch {batch}/{self.steps_per_epoch}); "
            f"{kept}. Lower the learning rate (OptimizerConfig.lr={self.cfg.optimizer.lr}) or enable "
            f"TrainConfig.grad_clip (now {self.cfg.grad_clip}), then restart the phase from the weights it started "
            "from (resuming its checkpoint would restore the learning rate saved in it)."
        )

    # --------------------------------------------------------------- evaluation
    def _evaluate_now(self) -> None:
        """A mid-epoch evaluation (``cfg.eval_every``) on the validation and test data."""
        record: dict = {"step": self.state.step}
        for prefix, data in (("val", self.val_data), ("test", self.eval_data)):
            if data is not None:
                metrics = self.evaluate(data)
                record.update({f"{prefix}_loss": metrics["loss"], f"{prefix}_acc": metrics["acc"]})
        self.evaluations.append(record)

    def evaluate(self, data: Iterable) -> dict:
        """Mean loss and accuracy over ``data`` in eval mode; the model's mode is restored."""
        return evaluate(self.model, data, device=self.device, autocast=self._autocast)

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically after the current epoch. The hooks'
        keys (``extra_optimizers``, ``extra_state``, ``stopped``) appear only when used, so a
        plain run's checkpoint is what it always was."""
        state = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "sparsifier": self.sparsifier.state_dict() if self.sparsifier is not None else None,
            "train_data": self.train_data.state_dict(),
            "train_state": dataclasses.asdict(self.state),
            "history": [dict(r) for r in self.history],
            "evaluations": [dict(r) for r in self.evaluations],
            "health": self.health,
            "rng": rng_state(),
            "config": dataclasses.asdict(self.cfg),
        }
        if self.extra_optimizers:
            state["extra_optimizers"] = [o.state_dict() for o in self.extra_optimizers]
        if self.extra_state:
            state["extra_state"] = {name: obj.state_dict() for name, obj in self.extra_state.items()}
        if self.stopped:
            state["stopped"] = True
        return state

    def _check_loadable(self, state: dict, path: str | Path | None) -> None:
        """Every check that can fail, done before anything is modified."""
        check_format(state, path)
        where = f"checkpoint {str(path)!r}" if path is not None else "the checkpoint"
        missing = [k for k in ("model", "optimizer", "lr_schedule", "train_data", "train_state", "rng") if k not in state]
        if missing:
            raise CheckpointError(f"{where} lacks {missing}; it is incomplete, resume from another checkpoint")
        check_model_compatible(self.model, state["model"], path)
        saved_groups = state["optimizer"].get("param_groups", [])
        ours = [len(g["params"]) for g in self.optimizer.param_groups]
        theirs = [len(g["params"]) for g in saved_groups]
        if ours != theirs:
            raise CheckpointError(
                f"{where} has optimizer param groups of sizes {theirs} but this trainer has {ours}; "
                "build the optimizer the same way as the run that wrote it"
            )
        has_sparsifier = state.get("sparsifier") is not None
        if has_sparsifier != (self.sparsifier is not None):
            raise CheckpointError(
                f"{where} was written {'with' if has_sparsifier else 'without'} a sparsifier but this trainer has "
                f"{'one' if self.sparsifier is not None else 'none'}; pass the same kind of sparsifier as the run that wrote it"
            )
        saved_extra = state.get("extra_optimizers", [])
        ours = [[len(g["params"]) for g in o.param_groups] for o in self.extra_optimizers]
        theirs = [[len(g["params"]) for g in o.get("param_groups", [])] for o in saved_extra]
        if ours != theirs:
            raise CheckpointError(
                f"{where} has {len(theirs)} extra optimizer(s) with param groups of sizes {theirs} but this trainer has "
                f"{len(ours)} with {ours}; pass the same extra_optimizers as the run that wrote it"
            )
        saved_names, our_names = set(state.get("extra_state", {})), set(self.extra_state)
        if saved_names != our_names:
            raise CheckpointError(
                f"{where} holds extra_state {sorted(saved_names)} but this trainer has {sorted(our_names)}; "
                "pass the same extra_state objects as the run that wrote it"
            )

    def load_state_dict(self, state: dict, path: str | Path | None = None) -> None:
        """Restore a :meth:`state_dict`; incompatible states raise before anything changes."""
        self._check_loadable(state, path)
        for name, obj in self.extra_state.items():  # first: the user's objects may refuse a state
            obj.load_state_dict(state["extra_state"][name])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for opt, saved in zip(self.extra_optimizers, state.get("extra_optimizers", [])):
            opt.load_state_dict(saved)
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.sparsifier is not None:
            self.sparsifier.load_state_dict(state["sparsifier"])
        self.train_data.load_state_dict(state["train_data"])
        self.state = TrainState(**state["train_state"])
        self.history = [dict(r) for r in state.get("history", [])]
        self.evaluations = [dict(r) for r in state.get("evaluations", [])]
        self.health = state.get("health")
        self.stopped = bool(state.get("stopped", False))
        set_rng_state(state["rng"])

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``path`` (default: ``checkpoint_path``) if it exists; returns whether it did."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None or not path.exists():
            return False
        self.load_state_dict(load_checkpoint(path), path)
        return True
