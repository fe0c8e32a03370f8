"""Typed experiment configs: frozen dataclasses built strictly from YAML / dicts.

Unknown keys raise with the list of known ones (a typo must never be silently ignored), and
values are checked against the field types.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..allocation import SCOPES, check_sparsity
from ..errors import ConfigError
from ..train.config import LRScheduleConfig, OptimizerConfig
from ..typed_config import from_dict


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"
    root: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 1000
    crop_padding: int = 0
    flip: bool = False
    validation: int = 0  # training images held out (fixed split, seed 0) for early stopping


@dataclass(frozen=True)
class ModelConfig:
    name: str = "lenet300_100"
    init: str | None = None  # None: the model's own; or "glorot_normal" / "variance_scaling" / "lecun_normal"

    def __post_init__(self) -> None:
        from ..models._common import INITIALISATIONS

        if self.init is not None and self.init not in INITIALISATIONS:
            raise ConfigError(f"unknown model.init {self.init!r}; known inits: {', '.join(sorted(INITIALISATIONS))}")


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase (dense training, or the fine-tune after each prune)."""

    epochs: int = 10
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    eval_every: int | None = None  # steps between validation/test evaluations (None: per epoch)


RESETS = ("keep", "rewind", "reinit")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune, how far, and with which method.

    One level per entry of ``sparsities``. For a method that prunes *after* training each
    level is a prune of the dense network followed by the ``finetune`` phase; ``cumulative``
    starts each level from the previous fine-tuned network (iterative pruning). For methods
    that prune *at init* or *during* training each level is a fresh run of the ``train`` phase
    from the same initialisation, with the method's sparsifier. ``params`` are the method's
    own hyperparameters (e.g. ``every``, ``drop_fraction``; see ``secateurs list``); ``scope``
    None means the method's default allocation. ``dense_baseline`` trains the dense network
    too (always done for after-training methods, which start from it).

    ``reset`` (after-training methods) sets the weights a pruned network is fine-tuned from:
    ``keep`` the trained ones (fine-tuning), ``rewind`` to the initialisation (lottery
    tickets, Frankle & Carbin 2019; with ``cumulative`` this is iterative magnitude pruning)
    or ``reinit`` to a fresh random initialisation (Scratch-E / Scratch-B, Liu et al. 2019,
    with ``finetune`` set to the dense schedule or a longer one).
    For at-init methods ``reinit`` trains the mask from an independent initialisation (the
    SNIP reference code's practice); ``rewind`` equals ``keep`` there. During-training
    methods take no reset.
    """

    method: str = "magnitude"
    scope: str | None = None
    sparsities: tuple[float, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    dense_baseline: bool = True
    reset: str = "keep"
    cumulative: bool = True
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    keep_dense: tuple[str, ...] = ()
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    allow_layer_collapse: bool = False

    def __post_init__(self) -> None:
        if self.reset not in RESETS:
            raise ConfigError(f"unknown prune.reset {self.reset!r}; known resets: {', '.join(RESETS)}")
        if self.scope is not None and self.scope not in SCOPES:
            raise ConfigError(f"unknown prune.scope {self.scope!r}; known scopes: {', '.join(SCOPES)}")
        for s in self.sparsities:
            check_sparsity(s, "prune.sparsities entry")
        if self.cumulative and list(self.sparsities) != sorted(self.sparsities):
            raise ConfigError(
                f"prune.sparsities {list(self.sparsities)} must increase when cumulative is true "
                "(pruning never revives weights); sort them or set cumulative: false"
            )


class HashedConfig:
    """A config that names its run directory by a hash of its non-default fields.

    Subclasses are frozen dataclasses whose every field has a default."""

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def non_default(self) -> dict:
        """Only the fields that differ from the defaults: hashing these (as open_lth does)
        means adding a new field with a default never renames existing runs."""
        return _diff(self.to_dict(), type(self)().to_dict())

    def short_hash(self) -> str:
        body = {k: v for k, v in self.non_default().items() if k != "name"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]

    def run_name(self) -> str:
        return f"{_slug(self.name)}-{self.short_hash()}"


@dataclass(frozen=True)
class ExperimentConfig(HashedConfig):
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: PhaseConfig = field(default_factory=PhaseConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=2))


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text.strip())
    return keep.strip("-") or "run"


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _diff(a: dict, b: dict) -> dict:
    out = {}
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict) and v and b[k]:
            sub = _diff(v, b[k])
            if sub:
                out[k] = sub
        elif b.get(k, object()) != v:
            out[k] = v
    return out


def read_yaml(path: str | Path, what: str = "config", example: str = "configs/") -> dict:
    """A YAML file as a dict; a missing or malformed file is one clear ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist; see {example} for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """A copy of ``data`` with dotted overrides (``train.epochs: 3``) applied; the inputs are
    never aliased or mutated."""
    out = copy.deepcopy(dict(data))
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {key}: {part} is not a section")
        node[leaf] = copy.deepcopy(value)
    return out


def load_typed(
    kind: type, path: str | Path | None, overrides: Mapping[str, Any] | None, what: str = "config",
    drop: tuple[str, ...] = (),
):
    """A typed config of ``kind`` from a YAML file (or the defaults) with dotted overrides
    applied; ``drop``: top-level keys read by the caller, not by ``kind``."""
    data = read_yaml(path, what) if path is not None else {}
    for key in drop:
        data.pop(key, None)
    return from_dict(kind, apply_overrides(data, overrides or {}))


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults) and apply dotted overrides like ``train.epochs``."""
    return load_typed(ExperimentConfig, path, overrides)
