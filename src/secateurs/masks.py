"""The sparsity state: one bool mask per prunable parameter.

Masks are applied *after* ``optimizer.step()`` with foreach multiplies instead of forward
hooks or parametrizations: ``torch.nn.utils.prune``'s hooks cost +34% per training step on
ResNet-50, a foreach multiply costs one pass over the weights. Gradients and optimizer state
(SGD momentum, Adam moments) of pruned weights are zeroed too, so a pruned weight carries no
stale history into a later regrowth.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, SparsityMismatchError

#: Module types whose ``weight`` is prunable by default.
DEFAULT_PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
)

_STATE_FORMAT = "secateurs.masks/1"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers.

    Unwrapping keeps parameter names identical across wrapped and plain runs, so masks and
    checkpoints are interchangeable between them.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_prunable(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    types: Sequence[type[nn.Module]] = DEFAULT_PRUNABLE_TYPES,
) -> dict[str, nn.Parameter]:
    """Parameters to mask, by name, in the model's registration order.

    By default the ``weight`` of every module of one of ``types``. ``include`` (glob patterns
    on parameter names, e.g. ``"features.*.weight"``) replaces that default; ``exclude``
    removes names. A pattern that matches nothing is an error: it is almost always a typo.
    """
    model = unwrap_model(model)
    named = dict(model.named_parameters())
    if include is not None:
        include = list(include)
        for pattern in include:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in named):
                raise ConfigError(
                    f"include pattern {pattern!r} matches no parameter; "
                    f"parameter names look like: {', '.join(list(named)[:6])}"
                )
        chosen = {n: p for n, p in named.items() if _matches(n, include)}
    else:
        type_tuple = tuple(types)
        chosen = {}
        for mod_name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, type_tuple) and isinstance(weight, nn.Parameter):
                chosen[f"{mod_name}.weight" if mod_name else "weight"] = weight
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in chosen):
            raise ConfigError(
                f"exclude pattern {pattern!r} matches no prunable parameter; "
                f"prunable names are: {', '.join(list(chosen)[:6])}"
            )
    chosen = {n: p for n, p in chosen.items() if not _matches(n, exclude)}
    if not chosen:
        kinds = ", ".join(t.__name__ for t in types)
        raise ConfigError(
            f"{type(model).__name__} has no prunable parameters (weights of {kinds}); "
            "pass include=['<glob on parameter names>'] to choose them"
        )
    return chosen


class Masks:
    """Bool masks for the prunable parameters of one model, and the ops that enforce them.

    ``masks[name]`` is the truth (``True`` = active). A float copy in the weight dtype is kept
    for the multiply, rebuilt only when the masks change: multiplying by a float tensor is
    several times faster than by a bool one (measured in ``benchmarks/bench_masks.py``).
    """

    def __init__(
        self,
        model: nn.Module,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        types: Sequence[type[nn.Module]] = DEFAULT_PRUNABLE_TYPES,
    ):
        self.params: dict[str, nn.Parameter] = select_prunable(model, include, exclude, types)
        self.masks: dict[str, torch.Tensor] = {
            n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()
        }
        self._weights: list[torch.Tensor] = list(self.params.values())
        self._multipliers: list[torch.Tensor] = []
        self._rebuild()

    # -- mapping-like access -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.masks)

    def __iter__(self) -> Iterator[str]:
        return iter(self.masks)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def names(self) -> list[str]:
        return list(self.masks)

    def weights(self) -> dict[str, torch.Tensor]:
        """The prunable weights by name (the live parameters)."""
        return dict(self.params)

    # -- statistics (these synchronise; keep them out of the per-step path) --------------
    def numel(self) -> dict[str, int]:
        return {n: m.numel() for n, m in self.masks.items()}

    def active(self) -> dict[str, int]:
        """Active (kept) weights per layer, computed with one host sync."""
        counts = torch.stack([torch.count_nonzero(m) for m in self.masks.values()]).tolist()
        return dict(zip(self.masks, (int(c) for c in counts)))

    def layer_sparsity(self) -> dict[str, float]:
        numel = self.numel()
        return {n: 1.0 - a / numel[n] for n, a in self.active().items()}

    def sparsity(self) -> float:
        """Fraction of masked weights over all prunable parameters."""
        total = sum(self.numel().values())
        return 1.0 - sum(self.active().values()) / total

    def stats(self) -> dict:
        """Per-layer and total counts, ready to serialise as JSON."""
        numel, active = self.numel(), self.active()
        total, kept = sum(numel.values()), sum(active.values())
        return {
            "sparsity": 1.0 - kept / total,
            "active": kept,
            "numel": total,
            "layers": {
                n: {"numel": numel[n], "active": active[n], "sparsity": 1.0 - active[n] / numel[n]}
                for n in numel
            },
        }

    # -- enforcement (the hot path) ------------------------------------------------------
    def _rebuild(self) -> None:
        self._multipliers = []
        for name, p in self.params.items():
            mask = self.masks[name]
            if mask.device != p.device:
                mask = self.masks[name] = mask.to(p.device)
            self._multipliers.append(mask.to(p.dtype))

    def _in_sync(self) -> bool:
        # The model may have been moved (.to(device) / .half()) after the masks were built.
        w, m = self._weights[0], self._multipliers[0]
        return w.device == m.device and w.dtype == m.dtype

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero the pruned weights (one foreach multiply over all layers)."""
        if not self._in_sync():
            self._rebuild()
        torch._foreach_mul_(self._weights, self._multipliers)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of pruned weights (call between backward and step if you clip
        or log gradient norms and want them to describe the sparse network)."""
        if not self._in_sync():
            self._rebuild()
        pairs = [(p.grad, m) for p, m in zip(self._weights, self._multipliers) if p.grad is not None]
        if pairs:
            grads, mults = zip(*pairs)
            torch._foreach_mul_(list(grads), list(mults))

    @torch.no_grad()
    def enforce_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Everything to do after ``optimizer.step()``, in one foreach multiply: pruned
        weights, their gradients and their per-element optimizer state back to zero."""
        if not self._in_sync():
            self._rebuild()
        tensors = list(self._weights)
        mults = list(self._multipliers)
        state = optimizer.state if optimizer is not None else {}
        for p, m in zip(self._weights, self._multipliers):
            if p.grad is not None:
                tensors.append(p.grad)
                mults.append(m)
            s = state.get(p)
            if s:
                for value in s.values():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        tensors.append(value)
                        mults.append(m if value.dtype == m.dtype else m.to(value.dtype))
        torch._foreach_mul_(tensors, mults)

    # -- changes ---------------------------------------------------------------------------
    def update_(self, new_masks: Mapping[str, torch.Tensor], expected_active: Mapping[str, int]) -> None:
        """Replace the masks, checking each layer holds exactly the planned number of weights.

        A mismatch raises :class:`SparsityMismatchError` and leaves the state unchanged: a
        silent off-by-some is how published sparsities end up wrong.
        """
        if set(new_masks) != set(self.masks):
            raise ConfigError(
                f"new masks name {sorted(set(new_masks) ^ set(self.masks))[:4]} which are not "
                "exactly the prunable parameters of this model"
            )
        for name, m in new_masks.items():
            if m.dtype != torch.bool or m.shape != self.masks[name].shape:
                raise ConfigError(
                    f"mask for {name} must be a bool tensor of shape {tuple(self.masks[name].shape)}, "
                    f"got {m.dtype} {tuple(m.shape)}"
                )
        counts = torch.stack([torch.count_nonzero(new_masks[n]) for n in self.masks]).tolist()
        wrong = [
            f"{n}: {int(c)} active, planned {expected_active[n]}"
            for n, c in zip(self.masks, counts)
            if int(c) != expected_active[n]
        ]
        if wrong:
            raise SparsityMismatchError(
                "achieved sparsity differs from the target: " + "; ".join(wrong[:5])
                + " (this is a bug in the score or allocation; please report it)"
            )
        for name in self.masks:
            self.masks[name] = new_masks[name].to(self.params[name].device)
        self._rebuild()

    # -- distributed -------------------------------------------------------------------------
    @torch.no_grad()
    def sync_(self, group=None) -> None:
        """Under ``torch.distributed`` with several ranks: check that every rank reached the
        same masks as rank 0 (decisions must come from identical inputs: all-reduced
        gradients, one seed), bit for bit. A no-op otherwise.

        Rank 0's masks are broadcast and every rank compares them with its own, exactly (a
        checksum can collide); one small all_gather of per-layer "differs" flags then lets a
        disagreement raise on every rank, naming the ranks and layers that differ, with the
        masks left unchanged.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
            return
        src = dist.get_global_rank(group, 0) if group is not None else 0
        # a new tensor: self.masks keeps this rank's own masks to compare with
        flat = torch.cat([m.reshape(-1) for m in self.masks.values()]).to(torch.uint8)
        dist.broadcast(flat, src=src, group=group)
        differs, offset = [], 0
        for m in self.masks.values():
            n = m.numel()
            differs.append((flat[offset:offset + n] != m.reshape(-1).to(torch.uint8)).any())
            offset += n
        local = torch.stack(differs).to(torch.uint8)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        ranks = [r for r, d in enumerate(gathered) if bool(d.any())]
        if ranks:
            names = list(self.masks)
            layers = sorted({names[i] for r in ranks for i in torch.nonzero(gathered[r]).reshape(-1).tolist()})
            raise SparsityMismatchError(
                f"masks differ across ranks after a mask update: rank(s) {ranks} disagree with rank 0 "
                f"on {', '.join(layers[:4])}; mask decisions must use identical inputs on every rank "
                "(DDP-averaged gradients, the same seed, the same batches for data-dependent scores)"
            )
        # every rank holds exactly rank 0's masks already: nothing to copy

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": _STATE_FORMAT,
            "masks": {n: m.detach().to("cpu", copy=True) for n, m in self.masks.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Load masks saved by :meth:`state_dict`; refuses masks of another model."""
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise CheckpointError("not a secateurs mask state (missing or unknown 'format' tag)")
        saved = state["masks"]
        missing = [n for n in self.masks if n not in saved]
        extra = [n for n in saved if n not in self.masks]
        shapes = [
            f"{n}: saved {tuple(saved[n].shape)} vs model {tuple(self.masks[n].shape)}"
            for n in self.masks
            if n in saved and saved[n].shape != self.masks[n].shape
        ]
        if missing or extra or shapes:
            details = "; ".join(
                ([f"missing {missing[:3]}"] if missing else [])
                + ([f"unexpected {extra[:3]}"] if extra else [])
                + shapes[:3]
            )
            raise CheckpointError(
                f"these masks belong to a different model ({details}); "
                "load them into the model they were saved from"
            )
        for name in self.masks:
            self.masks[name] = saved[name].to(device=self.params[name].device, dtype=torch.bool)
        self._rebuild()
