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
from .layers import class_layer_type, layer_type, notice, registered_layers, unregistered_matrix_modules

#: ``types=None`` means every registered layer type (:mod:`secateurs.layers`): Linear, Conv1d/2d/3d,
#: transformers' Conv1D and whatever a user registers.
DEFAULT_PRUNABLE_TYPES = None

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


def _aliases(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, list[nn.Module]]]:
    """Every name of every parameter (tied parameters have several; the first is the one
    ``named_parameters()`` reports, the canonical name) and every module that owns it."""
    names: dict[int, list[str]] = {}
    owners: dict[int, list[nn.Module]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module._parameters.items():
            if p is None:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if full not in names.setdefault(id(p), []):
                names[id(p)].append(full)
            if all(o is not module for o in owners.setdefault(id(p), [])):
                owners[id(p)].append(module)
    canonical = {id(p): n for n, p in model.named_parameters()}
    for key, listed in names.items():  # canonical name first
        listed.sort(key=lambda n: n != canonical.get(key))
    return names, owners


def prunable_layout(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    types: Sequence[type[nn.Module]] | None = DEFAULT_PRUNABLE_TYPES,
) -> tuple[dict[str, nn.Parameter], dict[str, int | None], dict[str, list[str]]]:
    """``(params, output_axes, aliases)`` of the parameters to mask, keyed by canonical name
    (the name ``model.named_parameters()`` gives), in registration order.

    By default: the weight of every module of a registered layer type (see
    :func:`secateurs.layers.register_layer`), or of ``types`` only. A weight *tied* to a module
    that is not a layer (a language model's output head sharing the token embedding) is left
    out, with one :class:`~secateurs.layers.PruningNotice`: pruning it would prune the
    embedding. ``include`` (glob patterns matched against every name of a parameter, aliases
    included) replaces the default; ``exclude`` removes names. A pattern that matches nothing
    is an error: it is almost always a typo. ``output_axes[name]`` is the axis indexing
    outputs, or None for a parameter of an unregistered module chosen by ``include``.
    """
    model = unwrap_model(model)
    names, owners = _aliases(model)
    params = {id(p): p for _, p in model.named_parameters()}
    canonical = {key: listed[0] for key, listed in names.items() if key in params}

    def axis_of(key: int) -> int | None:
        for module in owners.get(key, []):
            kind = layer_type(module)
            if kind is not None and module._parameters.get(kind.param) is params[key]:
                return kind.output_axis
        return None

    chosen: dict[int, str] = {}
    if include is not None:
        include = list(include)
        for pattern in include:
            if not any(fnmatch.fnmatchcase(n, pattern) for listed in names.values() for n in listed):
                raise ConfigError(
                    f"include pattern {pattern!r} matches no parameter; "
                    f"parameter names look like: {', '.join(list(canonical.values())[:6])}"
                )
        for key, listed in names.items():
            if key in params and any(_matches(n, include) for n in listed):
                chosen[key] = canonical[key]
                if len(listed) > 1:
                    notice(
                        f"{' = '.join(listed)} are one tied parameter: its mask is named {listed[0]!r} "
                        "and prunes every use of it"
                    )
    else:
        if types is not None:
            types = tuple(types)
            missing = [t.__name__ for t in types if class_layer_type(t) is None]
            if missing:
                raise ConfigError(
                    f"types {missing} are not registered layer types, so their weight layout is unknown; "
                    f"register them first, e.g. secateurs.register_layer({missing[0]}, output_axis=0) "
                    f"(registered: {', '.join(registered_layers())})"
                )
        left_out = []
        for _mod_name, module in model.named_modules():
            kind = layer_type(module)
            if kind is None or (types is not None and not isinstance(module, types)):
                continue
            p = module._parameters.get(kind.param)
            if not isinstance(p, nn.Parameter) or id(p) not in params:
                continue
            key = id(p)
            others = [o for o in owners[key] if layer_type(o) is None]
            if others:
                left_out.append((names[key], type(others[0]).__name__))
                continue
            chosen[key] = canonical[key]
        if left_out:
            shown = "; ".join(f"{' = '.join(n)} (shared with a {t})" for n, t in left_out[:3])
            notice(
                f"not pruned: {shown}. A tied weight is shared with a module that is not a prunable layer "
                f"(usually the token embedding), so pruning it would prune that too; to prune it anyway, "
                f"pass include=[...] with its name"
            )
        unknown = unregistered_matrix_modules(model)
        if unknown:
            shown = ", ".join(f"{n} ({t})" for n, t in unknown[:4])
            notice(
                f"not pruned: {shown}{' and more' if len(unknown) > 4 else ''} hold matrix weights but their "
                f"types are not registered layers; register the type with secateurs.register_layer({unknown[0][1]}, "
                "output_axis=0) or choose the parameter with include=[...]"
            )
    order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    keys = sorted(chosen, key=order.__getitem__)
    chosen_params = {chosen[k]: params[k] for k in keys}
    axes = {chosen[k]: axis_of(k) for k in keys}
    aliases = {chosen[k]: list(names[k]) for k in keys}
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for k in keys for n in names[k]):
            raise ConfigError(
                f"exclude pattern {pattern!r} matches no prunable parameter; "
                f"prunable names are: {', '.join(list(chosen_params)[:6])}"
            )
    dropped = {chosen[k] for k in keys if _matches_any(names[k], exclude)}
    chosen_params = {n: p for n, p in chosen_params.items() if n not in dropped}
    if not chosen_params:
        kinds = ", ".join(t.__name__ for t in types) if types is not None else ", ".join(registered_layers())
        raise ConfigError(
            f"{type(model).__name__} has no prunable parameters (weights of {kinds}); "
            "pass include=['<glob on parameter names>'] to choose them, or register its layer type "
            "with secateurs.register_layer(...)"
        )
    return (
        chosen_params,
        {n: axes[n] for n in chosen_params},
        {n: aliases[n] for n in chosen_params},
    )


def _matches_any(names: Iterable[str], patterns: Iterable[str]) -> bool:
    patterns = list(patterns)
    return any(_matches(n, patterns) for n in names)


def select_prunable(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    types: Sequence[type[nn.Module]] | None = DEFAULT_PRUNABLE_TYPES,
) -> dict[str, nn.Parameter]:
    """Parameters to mask, by canonical name, in the model's registration order (see
    :func:`prunable_layout` for the rules)."""
    return prunable_layout(model, include, exclude, types)[0]


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
        types: Sequence[type[nn.Module]] | None = DEFAULT_PRUNABLE_TYPES,
    ):
        self.params: dict[str, nn.Parameter]
        #: the axis of each weight that indexes output units (None: not a registered layer)
        self.output_axes: dict[str, int | None]
        #: every name of each parameter, canonical first (tied parameters have several)
        self.aliases: dict[str, list[str]]
        self.params, self.output_axes, self.aliases = prunable_layout(model, include, exclude, types)
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
        self.check_state(state)
        saved = state["masks"]
        for name in self.masks:
            self.masks[name] = saved[name].to(device=self.params[name].device, dtype=torch.bool)
        self._rebuild()

    def check_state(self, state: Mapping) -> None:
        """Raise :class:`CheckpointError` unless ``state`` holds masks of exactly these
        parameters and shapes (changes nothing)."""
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
