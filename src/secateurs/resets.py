"""Resets: what values the kept weights get, and where a mask's connections sit.

- :func:`snapshot` / :func:`rewind_`: save named tensors and copy them back bit for bit
  (lottery-ticket rewinding to init or to iteration k, Frankle & Carbin 2019; Frankle et al.
  2020; restoring initial values after a mask moved).
- :func:`reinitialize_`: draw named weights afresh from their layer's initialisation,
  seeded (the "reinit" sanity check of Frankle et al. 2021).
- :func:`shuffle_within_layers`: the same number of connections per layer at random
  positions (the "layer-wise random shuffling" sanity check of Frankle et al. 2021).
- :func:`init_kept_`: give a mask's kept weights their original, re-drawn, sign-only or
  sign-destroyed initial values (the kept-weight inits of Zhou et al. 2019, :data:`KEPT_INITS`).

All randomness comes from a ``torch.Generator`` passed in, drawn on the CPU, so the results are
identical on any device for a given generator state, and the global RNG is left untouched.
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError, UnknownNameError
from .masks import unwrap_model
from .registry import Registry

#: ``torch.nn.init`` functions :func:`reinitialize_` accepts by name (besides
#: ``"reset_parameters"``, the module's own initialisation).
INITS = (
    "reset_parameters",
    "xavier_normal",
    "xavier_uniform",
    "kaiming_normal",
    "kaiming_uniform",
    "orthogonal",
    "normal",
    "uniform",
)


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    model = unwrap_model(model)
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


def _resolve(model: nn.Module, names: Sequence[str] | None, available: Mapping[str, torch.Tensor]) -> list[str]:
    tensors = _named_tensors(model)
    names = list(available) if names is None else list(names)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ConfigError(
            f"{type(unwrap_model(model)).__name__} has no parameter or buffer named {', '.join(missing[:4])}; "
            f"its names look like: {', '.join(list(tensors)[:6])}"
        )
    return names


def snapshot(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of the named parameters / buffers (default: all), for :func:`rewind_`."""
    tensors = _named_tensors(model)
    names = _resolve(model, names, tensors)
    return {n: tensors[n].detach().clone() for n in names}


@torch.no_grad()
def rewind_(model: nn.Module, saved_state: Mapping[str, torch.Tensor], names: Sequence[str] | None = None) -> None:
    """Copy ``saved_state[name]`` back into the model's tensor ``name``, bit for bit.

    ``names`` defaults to every entry of ``saved_state`` (a :func:`snapshot` or a
    ``state_dict``). The copy is in place, so optimizers and masks keep pointing at the same
    tensors; shapes and dtypes must match exactly (a dtype conversion would not be bit-exact,
    and a silent one would hide that the snapshot came from another run).
    """
    tensors = _named_tensors(model)
    names = list(saved_state) if names is None else list(names)
    absent = [n for n in names if n not in saved_state]
    if absent:
        raise ConfigError(f"the saved state has no entry for {', '.join(absent[:4])}; save it with snapshot(model) first")
    names = _resolve(model, names, saved_state)
    for n in names:
        live, saved = tensors[n], saved_state[n]
        if live.shape != saved.shape or live.dtype != saved.dtype:
            raise ConfigError(
                f"cannot rewind {n}: saved {saved.dtype} {tuple(saved.shape)}, model has {live.dtype} "
                f"{tuple(live.shape)}; rewinding copies values bit for bit, so the saved state must come "
                "from this model in this dtype"
            )
    for n in names:
        tensors[n].copy_(saved_state[n])


def _fresh_value(module: nn.Module, attr: str, init: str | Callable[[torch.Tensor], object]) -> torch.Tensor:
    """A new value for ``module.<attr>`` on the CPU, drawn from the (already seeded) CPU RNG."""
    live = getattr(module, attr)
    if init == "reset_parameters":
        if not hasattr(module, "reset_parameters"):
            raise ConfigError(
                f"{type(module).__name__} has no reset_parameters(), so its default initialisation is unknown; "
                f"pass init= one of {', '.join(INITS[1:])}"
            )
        # A fresh copy of the module built on the CPU: its reset_parameters() draws exactly what
        # the module's own initialisation draws (fan-in / fan-out from the real shapes), and the
        # live module is not touched. Only the named tensor of the copy is used.
        fresh = copy.deepcopy(module).to("cpu")
        fresh.reset_parameters()
        return getattr(fresh, attr).detach()
    value = torch.empty(live.shape, dtype=live.dtype)
    if callable(init):
        init(value)
    else:
        getattr(nn.init, f"{init}_")(value)
    return value


@torch.no_grad()
def reinitialize_(
    model: nn.Module,
    names: Sequence[str],
    generator: torch.Generator,
    init: str | Callable[[torch.Tensor], object] = "reset_parameters",
) -> None:
    """Re-draw the named weights from their layer's initialisation distribution, in place.

    ``init="reset_parameters"`` (default) uses each module's own ``reset_parameters()`` (for
    ``nn.Linear`` / ``nn.Conv*``: Kaiming-uniform with ``a=sqrt(5)``); a name from
    :data:`INITS` uses that ``torch.nn.init`` function with its defaults (e.g.
    ``"xavier_normal"`` for models initialised Glorot-normal, as the zoo's LeNet, MLP and
    Conv-2/4/6 are); a callable ``init(tensor)`` fills a CPU tensor in place. The sanity check
    of Frankle et al. (2021) is only meaningful with the distribution the network was
    initialised with, so pass the model's own initialiser.

    Determinism: one seed per tensor is drawn from ``generator`` (in ``names`` order); the
    draw runs under :func:`torch.random.fork_rng` on the CPU with that seed, so the result
    depends only on the generator state and the shapes -- not on the device, not on the global
    RNG, which is left exactly as it was.
    """
    if isinstance(init, str) and init not in INITS:
        raise UnknownNameError(f"unknown init {init!r}; known inits: {', '.join(INITS)}, or a callable init(tensor)")
    root = unwrap_model(model)
    params = dict(root.named_parameters())
    for name in names:
        if name not in params:
            raise ConfigError(
                f"{type(root).__name__} has no parameter named {name}; its names look like: {', '.join(list(params)[:6])}"
            )
        owner, _, attr = name.rpartition(".")
        module = root.get_submodule(owner) if owner else root
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            value = _fresh_value(module, attr, init)
        params[name].copy_(value.to(params[name].device, params[name].dtype))


def shuffle_within_layers(masks, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """New masks with each layer's active connections at uniformly random positions.

    Every layer keeps exactly its number of active connections (so its density), only the
    positions move: Frankle et al. (2021) found that SNIP, GraSP and SynFlow masks
    lose no accuracy under this shuffle, i.e. these methods choose per-layer densities, not
    connections. Pure: the input masks (a mapping ``{name: bool tensor}`` or a
    :class:`~secateurs.masks.Masks`) are not modified. Permutations are drawn on the CPU.
    """
    masks = getattr(masks, "masks", masks)
    out: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        flat = mask.reshape(-1)
        perm = torch.randperm(flat.numel(), generator=generator).to(mask.device)
        out[name] = flat[perm].reshape(mask.shape).clone()
    return out


# -- initialisations of the kept weights (Zhou et al. 2019) -------------------------------
# Zhou, Lan, Liu & Yosinski (2019, "Deconstructing Lottery Tickets") asked what a ticket
# needs from its initial values: reinitialising kills it, but keeping only the *signs* (with
# fresh magnitudes, or one constant magnitude per layer) recovers most of its accuracy. Each
# policy below computes the new values of one masked layer from its initial values; the
# values at pruned positions are exactly zero.

#: kept-weight initialisations accepted by :func:`init_kept_`
KEPT_INITS: Registry[Callable] = Registry("kept-weight init")


def _by_policy(policy: str, description: str):
    return KEPT_INITS.register(policy, description)


@_by_policy("original", "the saved initial values (lottery-ticket rewinding)")
def _kept_original(initial: torch.Tensor, mask: torch.Tensor, fresh: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """The initial values themselves: the winning ticket of Frankle & Carbin (2019)."""
    return initial


@_by_policy("reinit", "a fresh draw from the layer's initialisation")
def _kept_reinit(initial: torch.Tensor, mask: torch.Tensor, fresh: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """A fresh draw: the control showing that tickets depend on their init (Zhou et al. 2019)."""
    return fresh


@_by_policy("reinit_same_sign", "fresh magnitudes with the initial signs")
def _kept_reinit_same_sign(initial: torch.Tensor, mask: torch.Tensor, fresh: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """|fresh| * sign(w_i): Zhou et al. (2019) found the signs carry most of the ticket."""
    return fresh.abs() * torch.sign(initial)


@_by_policy("reshuffle", "the kept initial values permuted among the kept positions")
def _kept_reshuffle(initial: torch.Tensor, mask: torch.Tensor, fresh: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Kept initial values permuted within the layer's kept positions: same value
    distribution, positions (and signs per position) scrambled (Zhou et al. 2019)."""
    flat_mask = mask.reshape(-1)
    kept = torch.nonzero(flat_mask).squeeze(1)
    perm = torch.randperm(kept.numel(), generator=generator).to(kept.device)
    out = torch.zeros_like(initial).reshape(-1)
    out[kept] = initial.reshape(-1)[kept][perm]
    return out.view_as(initial)


@_by_policy("signed_constant", "sign(w_i) times the std of the layer's initial values")
def _kept_signed_constant(initial: torch.Tensor, mask: torch.Tensor, fresh: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """sign(w_i) * std(w_i of the layer): the "constant" init of Zhou et al. (2019), which
    keeps only the signs. The std is over all the layer's initial values (kept and pruned),
    the population std (``correction=0``), so a one-weight layer gets 0 rather than NaN."""
    wide = torch.promote_types(initial.dtype, torch.float32)
    std = initial.to(wide).std(correction=0).to(initial.dtype)
    return torch.sign(initial) * std


@_by_policy("random_sign", "initial magnitudes with random signs (control)")
def _kept_random_sign(initial: torch.Tensor, mask: torch.Tensor, fresh: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """|w_i| with a fair random sign per weight: the control that destroys the signs only."""
    signs = torch.randint(0, 2, initial.shape, generator=generator).to(initial.device) * 2 - 1
    return initial.abs() * signs.to(initial.dtype)


@_by_policy("flipped_sign", "every initial sign flipped (control)")
def _kept_flipped_sign(initial: torch.Tensor, mask: torch.Tensor, fresh: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """-w_i: the control where every sign is wrong (Zhou et al. 2019)."""
    return -initial


_NEEDS_FRESH = ("reinit", "reinit_same_sign")


def _check_kept(
    root: nn.Module, masks: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]
) -> dict[str, nn.Parameter]:
    """The masked parameters, after checking every name and shape (before anything is written)."""
    params = dict(root.named_parameters())
    out: dict[str, nn.Parameter] = {}
    for name, mask in masks.items():
        if name not in params:
            raise ConfigError(
                f"{type(root).__name__} has no parameter named {name}; mask names must be parameter names "
                f"like: {', '.join(list(params)[:6])}"
            )
        if name not in initial:
            raise ConfigError(
                f"the initial weights have no entry for {name}; save them from the same model "
                "with snapshot(model) before training"
            )
        p = params[name]
        if mask.shape != p.shape or initial[name].shape != p.shape:
            raise ConfigError(
                f"{name}: parameter {tuple(p.shape)}, mask {tuple(mask.shape)}, initial {tuple(initial[name].shape)}; "
                "masks and initial weights must come from this model"
            )
        out[name] = p
    return out


@torch.no_grad()
def init_kept_(
    policy: str,
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    initial: Mapping[str, torch.Tensor],
    generator: torch.Generator,
    *,
    init: str | Callable[[torch.Tensor], object] = "reset_parameters",
) -> None:
    """Set every masked parameter of ``model`` to its kept-weight initialisation, in place.

    ``policy`` is one of :data:`KEPT_INITS` (Zhou et al. 2019): ``original``, ``reinit``,
    ``reinit_same_sign``, ``reshuffle``, ``signed_constant``, ``random_sign``,
    ``flipped_sign``. ``masks`` maps parameter names (``"fc1.weight"``) to bool masks (or is
    a :class:`~secateurs.masks.Masks`); ``initial`` holds the initial values by the same
    names (a :func:`snapshot`). Kept positions get the policy's value, pruned positions
    exactly ``0``. ``init`` is the initialisation the ``reinit*`` policies draw from (as in
    :func:`reinitialize_`).

    Deterministic given the generator state: every random draw is made on the CPU from
    ``generator`` (layers in ``masks`` order); the global RNG is left untouched. All names
    and shapes are checked before any parameter is written.
    """
    rule = KEPT_INITS.get(policy)
    masks = getattr(masks, "masks", masks)
    root = unwrap_model(model)
    params = _check_kept(root, masks, initial)
    if policy in _NEEDS_FRESH:
        reinitialize_(root, list(params), generator, init)
    for name, p in params.items():
        mask = masks[name].to(p.device).bool()
        start = initial[name].detach().to(p.device, p.dtype)
        fresh = p.detach().clone() if policy in _NEEDS_FRESH else None
        value = rule(start, mask, fresh, generator)
        p.copy_(torch.where(mask, value, torch.zeros((), dtype=p.dtype, device=p.device)))
