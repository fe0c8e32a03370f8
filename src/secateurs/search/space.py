"""The search space every architecture search shares: chains of blocks, serialisable.

A candidate (:class:`Architecture`) is a chain of :class:`Block` s fed by an image:

* **conv blocks** first: ``conv1`` / ``conv3`` / ``conv5`` (a k x k convolution, padding k//2)
  or ``dwsep3`` / ``dwsep5`` (a k x k depthwise convolution then a 1x1 pointwise one, as in
  MobileNet), each followed by batch norm (when the build asks for it) and ReLU, and by a 2x2
  max-pool when ``pool`` is set;
* then **fc blocks** (``fc``: flatten once, Linear + ReLU);
* then the classifier, one Linear to the classes.

An MLP is a chain of fc blocks only; the zoo's LeNet-300-100 is ``fc-300.fc-100``. PNAS
(:mod:`.pnas`) grows a chain one block at a time, DNAS (:mod:`.dnas`) derives one from its
supernet, grow-and-prune's MLP widths are :meth:`Architecture.mlp`, and the TE-NAS indicator
study builds its candidates with :func:`build` too. One function builds every candidate, and
the same candidate always gives the same module structure (names ``blocks.<i>.*``, ``head``).

:class:`SearchSpace` says which blocks a search may use: the ops, widths, how many conv and
fc blocks, and how many pools the image allows. It enumerates one-block-longer children
(:meth:`SearchSpace.expand`), draws uniform random candidates (:meth:`SearchSpace.sample`) and
turns a candidate into the fixed-length features a surrogate reads (:meth:`SearchSpace.features`).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..validate import check_bool, check_int

__all__ = [
    "CONV_OPS", "OPS", "Block", "Architecture", "InputShape", "SearchSpace", "build", "layer_shapes",
]

#: conv op -> (kernel size, depthwise separable)
CONV_OPS: dict[str, tuple[int, bool]] = {
    "conv1": (1, False), "conv3": (3, False), "conv5": (5, False), "dwsep3": (3, True), "dwsep5": (5, True),
}
OPS: tuple[str, ...] = (*CONV_OPS, "fc")


@dataclass(frozen=True)
class Block:
    """One block of a chain: ``op`` (one of :data:`OPS`) producing ``width`` channels / units,
    followed by a 2x2 max-pool when ``pool`` (conv ops only)."""

    op: str
    width: int
    pool: bool = False

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"unknown block op {self.op!r}; known ops: {', '.join(OPS)}")
        check_int(self.width, f"block {self.op} width", minimum=1)
        check_bool(self.pool, f"block {self.op} pool")
        if self.pool and self.op == "fc":
            raise ConfigError("an fc block cannot pool (pool: true is for conv blocks); drop pool from it")

    @property
    def conv(self) -> bool:
        return self.op != "fc"

    @property
    def label(self) -> str:
        return f"{self.op}-{self.width}{'p' if self.pool else ''}"

    def to_dict(self) -> dict:
        return {"op": self.op, "width": self.width, "pool": self.pool}


@dataclass(frozen=True)
class Architecture:
    """A candidate: conv blocks, then fc blocks (see the module docstring). Hashable, ordered,
    and a JSON round trip (:meth:`to_dict` / :meth:`from_dict`) gives the same candidate."""

    blocks: tuple[Block, ...] = ()

    def __post_init__(self) -> None:
        blocks = tuple(b if isinstance(b, Block) else Block(**b) for b in self.blocks)
        object.__setattr__(self, "blocks", blocks)
        seen_fc = False
        for b in blocks:
            if b.conv and seen_fc:
                raise ConfigError(
                    f"{self.label}: a conv block after an fc block; conv blocks come first (the image is "
                    "flattened at the first fc block)"
                )
            seen_fc = seen_fc or not b.conv

    @classmethod
    def mlp(cls, hidden: Sequence[int]) -> "Architecture":
        """An MLP with these hidden widths (``[]``: a linear classifier)."""
        return cls(tuple(Block("fc", int(w)) for w in hidden))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Architecture":
        if not isinstance(data, Mapping) or set(data) - {"blocks"}:
            raise ConfigError(f"an architecture is {{blocks: [{{op, width, pool}}, ...]}}, got {data!r}")
        blocks = []
        for b in data.get("blocks", ()):
            if not isinstance(b, Mapping) or set(b) - {"op", "width", "pool"} or not {"op", "width"} <= set(b):
                raise ConfigError(f"a block is {{op, width, pool}} (pool optional), got {b!r}")
            blocks.append(Block(**b))
        return cls(tuple(blocks))

    def to_dict(self) -> dict:
        return {"blocks": [b.to_dict() for b in self.blocks]}

    @property
    def label(self) -> str:
        """``conv3-16p.dwsep3-32.fc-64``; ``linear`` for no blocks."""
        return ".".join(b.label for b in self.blocks) or "linear"

    @property
    def conv_blocks(self) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.conv)

    @property
    def fc_blocks(self) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if not b.conv)

    @property
    def pools(self) -> int:
        return sum(b.pool for b in self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class InputShape:
    """What the candidates read and predict: ``channels`` x ``size`` x ``size`` images, ``classes``."""

    channels: int = 1
    size: int = 28
    classes: int = 10

    def __post_init__(self) -> None:
        for name in ("channels", "size", "classes"):
            check_int(getattr(self, name), f"input {name}", minimum=1)


def _check_pools(arch: Architecture, shape: InputShape) -> None:
    if shape.size >> arch.pools < 1:
        raise ConfigError(
            f"{arch.label} pools {arch.pools} times, which shrinks the {shape.size}px image to nothing; "
            f"use at most {int(math.log2(shape.size))} pools for this input"
        )


class _Block(nn.Sequential):
    """The layers of one conv block (kept together so a block is one submodule)."""


def build(arch: Architecture, shape: InputShape, *, batchnorm: bool = True) -> nn.Module:
    """The ``nn.Module`` that ``arch`` describes for images of ``shape``.

    With ``batchnorm`` every conv is followed by BatchNorm2d (and has no bias); without it the
    conv has a bias, which is how the TE-NAS indicator study builds its plain CNNs. Weights keep
    PyTorch's default initialisation; callers that want another re-initialise."""
    _check_pools(arch, shape)
    blocks: list[nn.Module] = []
    channels, side = shape.channels, shape.size
    for b in arch.conv_blocks:
        kernel, separable = CONV_OPS[b.op]
        layers: list[nn.Module] = []
        if separable:
            layers += [nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False),
                       nn.Conv2d(channels, b.width, 1, bias=not batchnorm)]
        else:
            layers.append(nn.Conv2d(channels, b.width, kernel, padding=kernel // 2, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(b.width))
        layers.append(nn.ReLU(inplace=True))
        if b.pool:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        blocks.append(_Block(*layers))
        channels = b.width
    features = channels * side * side
    blocks.append(nn.Flatten())
    for b in arch.fc_blocks:
        blocks.append(_Block(nn.Linear(features, b.width), nn.ReLU(inplace=True)))
        features = b.width
    model = nn.Sequential()
    model.add_module("blocks", nn.Sequential(*blocks))
    model.add_module("head", nn.Linear(features, shape.classes))
    return model


def layer_shapes(arch: Architecture, shape: InputShape) -> list[dict]:
    """Per block (then the head): its op, input and output feature shapes (without the batch
    dimension) and whether it pools -- what cost tables are keyed by."""
    _check_pools(arch, shape)
    out, channels, side = [], shape.channels, shape.size
    for b in arch.conv_blocks:
        after = side // 2 if b.pool else side
        out.append({"op": b.op, "in": (channels, side, side), "out": (b.width, after, after), "pool": b.pool})
        channels, side = b.width, after
    features = channels * side * side
    for b in arch.fc_blocks:
        out.append({"op": "fc", "in": (features,), "out": (b.width,), "pool": False})
        features = b.width
    out.append({"op": "head", "in": (features,), "out": (shape.classes,), "pool": False})
    return out


@dataclass(frozen=True)
class SearchSpace:
    """The candidates a search may propose: up to ``max_conv`` conv blocks with ops ``ops`` and
    widths ``conv_widths``, then up to ``max_fc`` fc blocks with widths ``fc_widths``, at most
    ``max_pools`` pools in a chain (None: as many as the image allows, down to 4px). Every
    conv block is offered with and without a pool."""

    ops: tuple[str, ...] = ("conv3", "conv5", "dwsep3", "dwsep5")
    conv_widths: tuple[int, ...] = (8, 16, 32)
    fc_widths: tuple[int, ...] = (32, 64, 128)
    max_conv: int = 3
    max_fc: int = 1
    max_pools: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "conv_widths", tuple(self.conv_widths))
        object.__setattr__(self, "fc_widths", tuple(self.fc_widths))
        unknown = [op for op in self.ops if op not in CONV_OPS]
        if unknown:
            raise ConfigError(f"unknown conv ops {unknown} in space.ops; known conv ops: {', '.join(CONV_OPS)} "
                              "(fc blocks come from space.max_fc and space.fc_widths)")
        check_int(self.max_conv, "space.max_conv", minimum=0)
        check_int(self.max_fc, "space.max_fc", minimum=0)
        for w in (*self.conv_widths, *self.fc_widths):
            check_int(w, "space widths", minimum=1)
        if self.max_pools is not None:
            check_int(self.max_pools, "space.max_pools", minimum=0)
        conv = self.max_conv > 0 and self.ops and self.conv_widths
        fc = self.max_fc > 0 and self.fc_widths
        if not conv and not fc:
            raise ConfigError(
                "the search space is empty: it needs conv blocks (space.max_conv >= 1 with space.ops and "
                "space.conv_widths) or fc blocks (space.max_fc >= 1 with space.fc_widths); got "
                f"ops={list(self.ops)}, conv_widths={list(self.conv_widths)}, max_conv={self.max_conv}, "
                f"fc_widths={list(self.fc_widths)}, max_fc={self.max_fc}"
            )
        if self.max_conv > 0 and (not self.ops or not self.conv_widths):
            raise ConfigError(f"space.max_conv is {self.max_conv} but space.ops or space.conv_widths is empty; "
                              "list some or set space.max_conv: 0")
        if self.max_fc > 0 and not self.fc_widths:
            raise ConfigError(f"space.max_fc is {self.max_fc} but space.fc_widths is empty; list some or set space.max_fc: 0")

    @property
    def max_blocks(self) -> int:
        return self.max_conv + self.max_fc

    def pool_limit(self, shape: InputShape) -> int:
        """Pools a chain may have: ``max_pools``, or halvings that keep the image >= 4px."""
        limit = max(0, int(math.log2(shape.size / 4))) if shape.size >= 4 else 0
        return limit if self.max_pools is None else min(limit, self.max_pools)

    def contains(self, arch: Architecture, shape: InputShape) -> bool:
        conv, fc = arch.conv_blocks, arch.fc_blocks
        return (len(conv) <= self.max_conv and len(fc) <= self.max_fc and arch.pools <= self.pool_limit(shape)
                and all(b.op in self.ops and b.width in self.conv_widths for b in conv)
                and all(b.width in self.fc_widths for b in fc))

    def _next_blocks(self, arch: Architecture, shape: InputShape) -> Iterator[Block]:
        if not arch.fc_blocks and len(arch.conv_blocks) < self.max_conv:
            pools = (False, True) if arch.pools < self.pool_limit(shape) else (False,)
            for op, width, pool in itertools.product(self.ops, self.conv_widths, pools):
                yield Block(op, width, pool)
        if len(arch.fc_blocks) < self.max_fc:
            for width in self.fc_widths:
                yield Block("fc", width)

    def expand(self, arch: Architecture, shape: InputShape) -> list[Architecture]:
        """Every candidate of the space with one more block appended to ``arch`` (PNAS's step
        from b to b+1 blocks); ``[]`` when ``arch`` is as long as the space allows."""
        return [Architecture(arch.blocks + (b,)) for b in self._next_blocks(arch, shape)]

    def roots(self, shape: InputShape) -> list[Architecture]:
        """The one-block candidates, where a progressive search starts."""
        return self.expand(Architecture(), shape)

    def sample(self, generator: torch.Generator, shape: InputShape) -> Architecture:
        """A random candidate: a length drawn uniformly from 1..max_blocks' reachable lengths,
        then each block drawn uniformly among those allowed after the previous ones."""
        length = 1 + int(torch.randint(self.max_blocks, (1,), generator=generator))
        arch = Architecture()
        for _ in range(length):
            options = list(self._next_blocks(arch, shape))
            if not options:
                break
            arch = Architecture(arch.blocks + (options[int(torch.randint(len(options), (1,), generator=generator))],))
        return arch

    def feature_names(self) -> list[str]:
        names = []
        for i in range(self.max_blocks):
            names += [f"b{i}:{op}" for op in OPS] + [f"b{i}:log2width", f"b{i}:pool"]
        return names

    def features(self, arch: Architecture) -> torch.Tensor:
        """A float64 vector of ``len(feature_names())``: per block position a one-hot op, log2
        of the width and the pool flag; positions past the chain's end are zeros. Conv blocks
        fill positions 0.., fc blocks the last ``max_fc`` positions, so a block's meaning does
        not move when the chain grows."""
        per = len(OPS) + 2
        x = torch.zeros(self.max_blocks * per, dtype=torch.float64)
        slots = list(range(len(arch.conv_blocks))) + [self.max_conv + i for i in range(len(arch.fc_blocks))]
        for slot, b in zip(slots, (*arch.conv_blocks, *arch.fc_blocks)):
            if slot >= self.max_blocks:
                raise ConfigError(f"{arch.label} is longer than the space allows ({self.max_conv} conv + {self.max_fc} fc)")
            x[slot * per + OPS.index(b.op)] = 1.0
            x[slot * per + len(OPS)] = math.log2(b.width)
            x[slot * per + len(OPS) + 1] = float(b.pool)
        return x

    def to_dict(self) -> dict:
        return {"ops": list(self.ops), "conv_widths": list(self.conv_widths), "fc_widths": list(self.fc_widths),
                "max_conv": self.max_conv, "max_fc": self.max_fc, "max_pools": self.max_pools}
