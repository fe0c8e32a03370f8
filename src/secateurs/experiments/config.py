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

from ..allocation import check_sparsity
from ..errors import ConfigError
from ..train.config import LRScheduleConfig, OptimizerConfig
from ..typed_config import from_dict
from ..validate import check_number
from ..vocabulary import SCOPES, SWEEP_RESETS


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"
    root: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 1000
    crop_padding: int = 0
    flip: bool = False
    validation: int = 0  # training images held out (fixed split, seed 0) for early stopping
    #: Symmetric label noise: this fraction of the training labels (after any validation
    #: holdout; validation and test stay clean) relabelled to a different class, chosen by
    #: ``derive_seed(seed, "data", "label-noise")`` (see ImageDataset.with_label_noise).
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        check_number(self.label_noise, "data.label_noise", minimum=0, below=1,
                     hint="the fraction of training labels to corrupt, e.g. data.label_noise=0.2 (0 for clean labels)")


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
    #: A phase that learns nothing: "error" stops the run, "mark" records it, "off" does not
    #: check; None (unset) is the command's own default (see :meth:`train_config`).
    health: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if self.health is not None and self.health not in HEALTH:
            raise ConfigError(f"unknown health {self.health!r}; known: {', '.join(HEALTH)}")
        if self.epochs == 0:
            return  # nothing trains: the schedule is never used
        schedule = self.lr_schedule
        if schedule.warmup_epochs > self.epochs:
            raise ConfigError(
                f"lr_schedule.warmup_epochs ({schedule.warmup_epochs:g}) is longer than the {self.epochs} epoch(s) of "
                "training: the learning rate would never reach optimizer.lr. Shorten the warm-up or train longer"
            )
        late = [m for m in schedule.milestones if m >= self.epochs]
        if schedule.name == "multistep" and late:
            raise ConfigError(
                f"lr_schedule.milestones {late} are at or past the end of training ({self.epochs} epoch(s)): they would "
                f"never lower the learning rate. Drop them (e.g. lr_schedule.milestones=[{', '.join(str(m) for m in schedule.milestones if m < self.epochs)}]"
                f"{', lr_schedule.name=constant' if len(late) == len(schedule.milestones) else ''}) or train longer"
            )

    def train_config(self, *, seed: int, device: str, health: str = "error"):
        """This phase as the training loop's :class:`~secateurs.train.TrainConfig`; ``health``
        is the command's default for a phase whose config leaves it unset ("error" stops a run
        that learns nothing; where learning nothing is a measurement, e.g. an architecture that
        cannot learn, the command passes "mark"). A value the config sets is kept."""
        from ..train import TrainConfig

        return TrainConfig(
            epochs=self.epochs, optimizer=self.optimizer, lr_schedule=self.lr_schedule, seed=seed, device=device,
            grad_clip=self.grad_clip, label_smoothing=self.label_smoothing, eval_every=self.eval_every,
            health=self.health if self.health is not None else health,
        )


#: What a phase that learned nothing does (see :class:`secateurs.train.TrainConfig`).
HEALTH = ("error", "mark", "off")


#: the resets a sweep takes (``prune.reset``): a subset of :data:`secateurs.vocabulary.RESETS`
RESETS = SWEEP_RESETS


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
        object.__setattr__(self, "reset", SWEEP_RESETS.check(self.reset, "prune.reset"))
        if self.scope is not None:
            object.__setattr__(self, "scope", SCOPES.check(self.scope, "prune.scope"))
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

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.train.epochs < 1:
            raise ConfigError(
                "train.epochs is 0: nothing would be trained, and the results would describe an untrained network. "
                "Set train.epochs (--epochs) to 1 or more"
            )


def check_device(name: str) -> None:
    """A device name torch knows ('auto' means CUDA when present), checked before any work."""
    if not isinstance(name, str):
        raise ConfigError(f"device must be a string such as 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "auto":
        return
    try:
        import torch

        torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {name!r} is not a device torch knows; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None


def _non_default(value: Any) -> Any:
    """A dataclass as a plain dict of only its fields that differ from their defaults
    (recursively), so adding an option with a default never changes a hash."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.default is not dataclasses.MISSING and v == f.default:
                continue
            if f.default_factory is not dataclasses.MISSING and v == f.default_factory():
                continue
            out[f.name] = _non_default(v)
        return out
    if isinstance(value, dict):
        return {k: _non_default(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_non_default(v) for v in value]
    return value


def aggregate_dir(runs_dir: str | Path, config: Any, kind: str, extra: Any = None) -> Path:
    """Where a multi-run study writes its tables and plots: ``<name>-<hash>-<kind>``, the hash
    over the study's non-default settings (and ``extra``, e.g. the seeds aggregated), so a
    changed ``--set`` writes its own aggregate instead of overwriting another's."""
    body = {k: v for k, v in _non_default(config).items() if k != "name"}
    digest = hashlib.sha256(json.dumps([body, extra], sort_keys=True, default=str).encode()).hexdigest()[:8]
    return Path(runs_dir) / f"{_slug(config.name)}-{digest}-{kind}"


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


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain
    YAML lets the last one silently win)."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in with << may be overridden, as YAML intends
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and {key_node.start_mark.line + 1}"
                f" of {key_node.start_mark.name}); YAML would silently keep the last one. Delete one of them"
            )
        seen[key] = key_node.start_mark.line
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML syntax error on one line: where, and what the parser expected."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    return where + ("; ".join(p for p in parts if p) or str(error).replace("\n", " "))


def load_yaml_text(text: str, name: str = "<string>"):
    """Parse YAML text strictly (duplicate keys are errors); YAMLError on bad syntax."""
    loader = _StrictLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str = "config", example: str = "configs/") -> dict:
    """A YAML file as a dict; a missing, empty or malformed file, or one with a key given
    twice, is one clear ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} file {path} is a directory; pass a YAML file (see {example} for examples)")
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist; see {example} for examples")
    try:
        data = load_yaml_text(path.read_text(), str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {path} is not valid YAML: {yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file {path} is not a text file; pass a YAML config (see {example})") from None
    if data is None:
        raise ConfigError(
            f"{what} file {path} is empty; it would run every default silently. Write the keys you mean "
            f"(see {example} for examples)"
        )
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
    drop: tuple[str, ...] = (), prepare=None,
):
    """A typed config of ``kind`` from a YAML file (or the defaults) with dotted overrides
    applied; ``drop``: top-level keys read by the caller, not by ``kind``."""
    data = read_yaml(path, what) if path is not None else {}
    for key in drop:
        data.pop(key, None)
    merged = apply_overrides(data, overrides or {})
    try:
        return from_dict(kind, prepare(merged) if prepare is not None else merged)
    except ConfigError as e:
        known = {f.name for f in dataclasses.fields(kind)}
        hint = next((cmd for key, cmd in COMMAND_KEYS.items() if key in data and key not in known), None)
        if hint is None:
            raise
        raise type(e)(f"{e}. {path} looks like a `secateurs {hint}` config (it has {_marker(hint)}); "
                      f"run it with: secateurs {hint} --config {path}") from None


#: A top-level key that marks a config file as belonging to one command.
COMMAND_KEYS = {"variants": "compare", "lottery": "lottery", "regeneration": "plasticity",
                "structured": "structured", "growth": "grow", "grow_prune": "grow-prune", "snl": "linearize",
                "indicators": "indicators", "prune": "train"}


def _marker(command: str) -> str:
    return next(f"a {key!r} section" for key, cmd in COMMAND_KEYS.items() if cmd == command)


def with_model_defaults(data: Mapping[str, Any], kind: type | None = None) -> dict:
    """``data`` with the chosen model's own training defaults (a factory's ``train_defaults``,
    dotted keys, e.g. LeNet-5's learning rate) filled in where the config leaves them unset.
    They are written into the run's config, so its hash and ``config.yaml`` show them.

    ``kind``: the config class ``data`` is for (default :class:`ExperimentConfig`); only keys
    under its own top-level sections are filled (a lottery config has no ``finetune``). A key
    whose section is there but is not a mapping (``train: 5``) is left for the config's own
    check to report."""
    from ..models import MODELS

    sections = {f.name for f in dataclasses.fields(kind or ExperimentConfig)}
    model = data.get("model")
    name = (model or {}).get("name", ModelConfig.name) if isinstance(model, (dict, type(None))) else None
    if not isinstance(name, str) or name not in MODELS:
        return dict(data)  # a bad or unknown name fails later, with the known names
    out = dict(data)
    for key, value in getattr(MODELS.get(name), "train_defaults", {}).items():
        if key.split(".")[0] not in sections:
            continue
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            out = apply_overrides(out, {key: value})
    return out


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults) and apply dotted overrides like ``train.epochs``;
    the model's own training defaults fill what neither sets (:func:`with_model_defaults`)."""
    return load_typed(ExperimentConfig, path, overrides, prepare=with_model_defaults)
