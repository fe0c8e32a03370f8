"""Typed experiment configs: frozen dataclasses built strictly from YAML / dicts.

Unknown keys raise with the list of known ones (a typo must never be silently ignored), and
values are checked against the field types.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..allocation import SCOPES, check_sparsity
from ..errors import ConfigError
from ..train.config import LRScheduleConfig, OptimizerConfig


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"
    root: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 1000
    crop_padding: int = 0
    flip: bool = False


@dataclass(frozen=True)
class ModelConfig:
    name: str = "lenet300_100"


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase (dense training, or the fine-tune after each prune)."""

    epochs: int = 10
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    grad_clip: float | None = None
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class PruneConfig:
    """Prune after training: one level per entry of ``sparsities``, each followed by a
    fine-tune. ``cumulative`` starts each level from the previous fine-tuned network
    (iterative pruning); otherwise every level starts from the dense network."""

    method: str = "magnitude"
    scope: str = "global"
    sparsities: tuple[float, ...] = ()
    cumulative: bool = True
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    keep_dense: tuple[str, ...] = ()
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    allow_layer_collapse: bool = False

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ConfigError(f"unknown prune.scope {self.scope!r}; known scopes: {', '.join(SCOPES)}")
        for s in self.sparsities:
            check_sparsity(s, "prune.sparsities entry")
        if self.cumulative and list(self.sparsities) != sorted(self.sparsities):
            raise ConfigError(
                f"prune.sparsities {list(self.sparsities)} must increase when cumulative is true "
                "(pruning never revives weights); sort them or set cumulative: false"
            )


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: PhaseConfig = field(default_factory=PhaseConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=2))

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def non_default(self) -> dict:
        """Only the fields that differ from the defaults: hashing these (as open_lth does)
        means adding a new field with a default never renames existing runs."""
        return _diff(self.to_dict(), ExperimentConfig().to_dict())

    def short_hash(self) -> str:
        body = {k: v for k, v in self.non_default().items() if k != "name"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]

    def run_name(self) -> str:
        return f"{_slug(self.name)}-{self.short_hash()}"


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


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown keys."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"known keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(opt, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
            return tuple(_coerce(item, v, where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where} must have {len(args)} entries, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_coerce(kt, k, where): _coerce(vt, v, where) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 as a string
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool) or tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults) and apply dotted overrides like ``train.epochs``."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {key}: {part} is not a section")
        node[parts[-1]] = value
    return from_dict(ExperimentConfig, data)
