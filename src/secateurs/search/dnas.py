"""Differentiable architecture search with tiered pruning (PruNet: Kierat et al. 2022, "Tiered
Pruning for Efficient Differentiable Inference-Aware Neural Architecture Search", arXiv
2209.11785), on the shared search space of :mod:`.space`.

The search trains a **supernet** of stochastic layers, FBNet style (Wu et al. 2019, §3): each
layer holds every candidate block, mixes their outputs with Gumbel-softmax weights over learned
architecture logits (temperature annealed from ``temperature_start`` to ``temperature_end``),
and the loss adds the supernet's **expected latency** (a sum over layers of choice
probabilities x block latencies, so it is differentiable in the logits). The network weights
and the architecture logits are optimised alternately on two disjoint sets of batches (FBNet's
80 / 20 split of the training set; :meth:`DNAS.train_epoch`), after ``warmup_epochs`` of
weights only. On top of that, PruNet's three pruning tiers (§3.1-3.3):

1. **Prunode** (§3.1, :class:`Prunode`): the width of a block is searched by *two* masks over
   the channel dimension, a small one (``small`` channels) and a big one (``big``), with a
   learnable choice between them. The block is computed once, at ``big`` channels, and its
   output is multiplied by ``g_small * m_small + g_big * m_big`` (Gumbel-softmax weights ``g``):
   one path's compute and memory whatever the number of widths (the paper's O(1)). The masks
   move as the search goes on: when one mask's probability reaches ``prunode_threshold`` the
   pair moves one candidate width towards it (shrinks or grows) and the choice restarts even.
   Pairs start at the widest widths, so the search prunes channels away from the top, and the
   channels above ``big`` are not computed at all.
2. **Pruning blocks within a stochastic layer** (§3.2, :meth:`DNAS.prune_blocks`): after
   ``prune_warmup_epochs``, at the end of each epoch a candidate whose probability (the softmax
   of its layer's logits over the candidates still in it) is below ``block_threshold`` is
   removed from the layer: it is no longer computed, sampled or counted in the latency. The
   layer's most probable block is never removed, so a layer always keeps a block.
3. **Pruning stochastic layers** (§3.3, :meth:`DNAS.prune_layers`): at the same times, a layer
   whose skip (identity) choice has probability at least ``layer_threshold`` is removed from
   the supernet (it becomes the identity), which shortens every later step of the search.

:meth:`DNAS.derive` reads the result as an :class:`~.space.Architecture` (the most probable
block of every remaining layer, dropping layers whose most probable choice is the skip, each
stage at its Prunode's more probable width), which the caller retrains from scratch.

**The skeleton** (ours; PruNet's is a GPUNet-like ImageNet space, far too big for 28 x 28
images on two CPU cores). ``stages`` lists how many stochastic conv layers each stage has; the
first layer of every stage ends with a 2x2 max-pool (28 -> 14 -> 7 for the default two stages)
and has no skip choice (a skipped pool would change every later shape, and the derived chain
has no pool-only block); the other layers of the stage keep its width and offer the skip
(identity). One Prunode per stage chooses the stage's width, shared by all its layers and all
their candidate ops: a skip is an identity only if a layer's input and output widths are equal,
so the layers that may be skipped must share a width (as FBNetV2's channel masks are shared
within a stage). Then ``fc_layers`` fc layers (one Prunode over ``fc_widths``; the first has no
skip, since its input is the flattened image features), then the classifier.

**Latency.** ``latency(block, in_shape) -> seconds`` comes from outside (e.g.
``secateurs.search.cost.LatencyTable.block_latency``, measured on this machine, or
:func:`macs_latency`, a machine-independent stand-in). It is called only at the measured widths
(``widths`` / ``fc_widths``) and at those widths' input shapes; a Prunode width between two
measured widths (``width_step``) gets the bilinear interpolation (in input and output width) of
the four neighbouring measurements. Every value used is kept in :meth:`DNAS.state_dict`, so a
resumed search sees the same latencies even if the table changed.

**Simplifications.** The Prunode moves by one candidate width at a time with a fixed step, and
its two logits restart even after each move (the paper's schedule of the masks' distance is not
reproduced); the expected latency uses the softmax probabilities, not the Gumbel samples
(lower variance, same expectation); the pruning criteria are plain probability thresholds
checked once per epoch, with our defaults for the thresholds.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..seeding import derive_seed
from ..validate import check_bool, check_int, check_number, describe
from .space import CONV_OPS, Architecture, Block, InputShape

__all__ = [
    "SKIP", "DNASSettings", "SuperBlock", "Prunode", "StochasticLayer", "Supernet", "DNAS", "macs_latency",
    "LatencyFn",
]

#: The identity choice of a stochastic layer (PruNet §3.3 removes a layer whose skip dominates).
SKIP = "skip"

#: ``latency(block, in_shape) -> seconds`` of one block at that input shape (without the batch
#: dimension: ``(C, H, W)`` for a conv block, ``(features,)`` for an fc block).
LatencyFn = Callable[[Block, tuple], float]

_FORMAT = "secateurs.search.dnas"


def macs_latency(block: Block, in_shape: tuple[int, ...]) -> float:
    """A machine-independent stand-in for a latency table: the block's multiply-accumulates per
    example at one nominal GMAC per second (1e-9 s per MAC). Counted as
    :func:`secateurs.search.cost.macs` counts them (output elements x fan-in; the pool, batch
    norm and ReLU are free)."""
    if not isinstance(block, Block):
        raise ConfigError(f"macs_latency needs a Block, got {describe(block)}; e.g. Block('conv3', 16)")
    if block.conv:
        if len(in_shape) != 3:
            raise ConfigError(f"a conv block's input shape is (C, H, W), got {in_shape!r}")
        c, h, w = (int(v) for v in in_shape)
        kernel, separable = CONV_OPS[block.op]
        area = h * w
        macs = c * area * kernel * kernel + block.width * area * c if separable else block.width * area * c * kernel ** 2
    else:
        macs = math.prod(int(v) for v in in_shape) * block.width
    return macs * 1e-9


# -- settings ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DNASSettings:
    """Everything that decides a DNAS search (see the module docstring for the skeleton).

    Supernet: ``stages`` (stochastic conv layers per stage, each stage's first layer pools),
    ``ops`` (candidate conv ops; ``skip`` adds the identity choice to the layers that may be
    skipped), ``widths`` (the conv widths the latency is measured at; each stage's Prunode moves
    between ``min(widths)`` and ``max(widths)``, through ``widths`` and, with ``width_step``,
    every ``width_step`` channels in between), ``fc_layers`` / ``fc_widths`` / ``fc_width_step``
    likewise for the fc stage, ``batchnorm`` as in :func:`.space.build`.

    Search: ``epochs``; ``warmup_epochs`` train the weights only (FBNet §4.1); the temperature
    falls exponentially from ``temperature_start`` (first epoch) to ``temperature_end`` (last);
    weights by SGD (``weight_lr`` cosine-annealed over the epochs, ``momentum``,
    ``weight_decay``), architecture logits by Adam (``arch_lr``, ``arch_weight_decay``).

    Latency: the architecture loss is cross-entropy + ``latency_weight`` x the expected latency
    over a reference: ``E[lat] / E0`` without a ``latency_target`` (E0: the expected latency of
    the supernet as it starts, uniform choices at the widest widths), or ``max(0, E[lat] /
    latency_target - 1)`` with one (seconds; only latency above the target costs).

    Pruning (PruNet §3): ``prunode_threshold`` (a Prunode mask pair moves when one mask's
    probability reaches it; 1.0 never moves), ``block_threshold`` (blocks below this probability
    are pruned; 0 prunes none), ``layer_threshold`` (layers whose skip reaches it are removed;
    1.0 removes none), checked at the end of each epoch after ``prune_warmup_epochs``."""

    stages: tuple[int, ...] = (1, 2)
    ops: tuple[str, ...] = ("conv3", "conv5", "dwsep3", "dwsep5")
    skip: bool = True
    widths: tuple[int, ...] = (8, 16, 24)
    width_step: int | None = 4
    fc_layers: int = 1
    fc_widths: tuple[int, ...] = (32, 64, 128)
    fc_width_step: int | None = 16
    batchnorm: bool = True
    epochs: int = 6
    warmup_epochs: int = 1
    prune_warmup_epochs: int = 2
    temperature_start: float = 5.0
    temperature_end: float = 0.5
    weight_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    arch_lr: float = 0.05
    arch_weight_decay: float = 0.0
    latency_weight: float = 0.5
    latency_target: float | None = None
    prunode_threshold: float = 0.6
    block_threshold: float = 0.1
    layer_threshold: float = 0.5

    def __post_init__(self) -> None:
        what = "DNASSettings."
        for name in ("stages", "ops", "widths", "fc_widths"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)):
                raise ConfigError(f"{what}{name} must be a list, got {describe(value)}")
            object.__setattr__(self, name, tuple(value))
        for n in self.stages:
            check_int(n, f"{what}stages entry", minimum=1, hint="the number of stochastic layers of a stage, e.g. stages=[2, 2]")
        check_int(self.fc_layers, f"{what}fc_layers", minimum=0)
        if not self.stages and self.fc_layers == 0:
            raise ConfigError(f"{what}stages is empty and {what}fc_layers is 0: the supernet has no stochastic layer; "
                              "give conv stages (e.g. stages=[2, 2]) or fc layers (fc_layers=1)")
        if self.stages:
            if not self.ops:
                raise ConfigError(f"{what}ops is empty; list the candidate conv ops, e.g. ops=[conv3, dwsep3]")
            unknown = [op for op in self.ops if op not in CONV_OPS]
            if unknown:
                raise ConfigError(f"{what}ops has unknown conv ops {unknown}; known: {', '.join(CONV_OPS)} "
                                  "(the identity is the skip setting, fc layers are fc_layers)")
            if len(set(self.ops)) != len(self.ops):
                raise ConfigError(f"{what}ops lists an op twice ({list(self.ops)}); list each once")
        check_bool(self.skip, f"{what}skip")
        check_bool(self.batchnorm, f"{what}batchnorm")
        for name, grid, step, used in (("widths", self.widths, self.width_step, bool(self.stages)),
                                       ("fc_widths", self.fc_widths, self.fc_width_step, self.fc_layers > 0)):
            stepname = "width_step" if name == "widths" else "fc_width_step"
            check_int(step, f"{what}{stepname}", minimum=1, optional=True,
                      hint="the channels a Prunode moves by between measured widths (None: only the measured widths)")
            for w in grid:
                check_int(w, f"{what}{name} entry", minimum=1)
            if len(set(grid)) != len(grid):
                raise ConfigError(f"{what}{name} lists a width twice ({list(grid)}); list each once")
            if used and len(_candidates(grid, step)) < 2:
                raise ConfigError(
                    f"{what}{name} {list(grid)} with {stepname}={step} gives fewer than two widths, but a Prunode "
                    f"chooses between two masks; give at least two widths, e.g. {name}=[8, 16]")
        check_int(self.epochs, f"{what}epochs", minimum=1)
        check_int(self.warmup_epochs, f"{what}warmup_epochs", minimum=0, below=self.epochs,
                  hint="epochs of weight training before the architecture is; fewer than epochs, or nothing is searched")
        check_int(self.prune_warmup_epochs, f"{what}prune_warmup_epochs", minimum=self.warmup_epochs,
                  hint="epochs before pruning starts; at least warmup_epochs (pruning needs trained architecture "
                       "logits), epochs or more to never prune")
        check_number(self.temperature_start, f"{what}temperature_start", above=0, finite=True)
        check_number(self.temperature_end, f"{what}temperature_end", above=0, finite=True)
        check_number(self.weight_lr, f"{what}weight_lr", above=0, finite=True)
        check_number(self.momentum, f"{what}momentum", minimum=0, below=1)
        check_number(self.weight_decay, f"{what}weight_decay", minimum=0, finite=True)
        check_number(self.arch_lr, f"{what}arch_lr", above=0, finite=True)
        check_number(self.arch_weight_decay, f"{what}arch_weight_decay", minimum=0, finite=True)
        check_number(self.latency_weight, f"{what}latency_weight", minimum=0, finite=True,
                     hint="0 searches for accuracy alone")
        check_number(self.latency_target, f"{what}latency_target", above=0, finite=True, optional=True,
                     hint="seconds; None penalises the expected latency relative to the starting supernet's")
        check_number(self.prunode_threshold, f"{what}prunode_threshold", above=0.5, maximum=1,
                     hint="the probability at which a Prunode's mask pair moves (1.0: never)")
        check_number(self.block_threshold, f"{what}block_threshold", minimum=0, below=1,
                     hint="blocks whose probability falls below it are pruned (0: none)")
        check_number(self.layer_threshold, f"{what}layer_threshold", above=0, maximum=1,
                     hint="layers whose skip probability reaches it are removed (1.0: none)")

    @property
    def conv_candidates(self) -> tuple[int, ...]:
        """The widths a conv stage's Prunode may stop at, ascending."""
        return _candidates(self.widths, self.width_step)

    @property
    def fc_candidates(self) -> tuple[int, ...]:
        return _candidates(self.fc_widths, self.fc_width_step)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


def _candidates(grid: Sequence[int], step: int | None) -> tuple[int, ...]:
    if not grid:
        return ()
    out = set(grid)
    if step is not None:
        out |= set(range(min(grid), max(grid) + 1, step))
    return tuple(sorted(out))


# -- modules ----------------------------------------------------------------------------------------
class SuperBlock(nn.Module):
    """One candidate block (an op of :data:`.space.OPS`) at its widest: ``in_max`` input and
    ``out_max`` output channels (features). ``forward(x, width)`` computes it on the input's
    channels only (``x.shape[1]``, which may be fewer than ``in_max``) and for the first
    ``width`` output channels, with the weights' leading slices: the same module, layer for
    layer, as :func:`.space.build` makes for ``Block(op, width, pool)`` with those slices as its
    weights. Weight sharing across widths is what lets a Prunode search the width in one path."""

    def __init__(self, op: str, in_max: int, out_max: int, *, pool: bool = False, batchnorm: bool = True,
                 flat_in: int = 1):
        super().__init__()
        self.op, self.pool, self.batchnorm = op, pool, batchnorm
        self.in_max, self.out_max = in_max, out_max
        #: fc blocks reading flattened conv features: input features per channel (H x W)
        self.flat_in = flat_in
        if op == "fc":
            self.linear = nn.Linear(in_max * flat_in, out_max)
            return
        kernel, separable = CONV_OPS[op]
        self.kernel, self.separable = kernel, separable
        if separable:
            self.depthwise = nn.Conv2d(in_max, in_max, kernel, padding=kernel // 2, groups=in_max, bias=False)
            self.conv = nn.Conv2d(in_max, out_max, 1, bias=not batchnorm)
        else:
            self.conv = nn.Conv2d(in_max, out_max, kernel, padding=kernel // 2, bias=not batchnorm)
        self.bn = nn.BatchNorm2d(out_max) if batchnorm else None

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        if self.op == "fc":
            features = x.shape[1]
            return F.relu(F.linear(x, self.linear.weight[:width, :features], self.linear.bias[:width]))
        c = x.shape[1]
        if self.separable:
            x = F.conv2d(x, self.depthwise.weight[:c], padding=self.kernel // 2, groups=c)
            weight, pad = self.conv.weight[:width, :c], 0
        else:
            weight, pad = self.conv.weight[:width, :c], self.kernel // 2
        bias = None if self.conv.bias is None else self.conv.bias[:width]
        x = F.conv2d(x, weight, bias, padding=pad)
        if self.bn is not None:
            bn = self.bn
            if bn.training and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            # slices of the running statistics are views: batch_norm updates them in place
            x = F.batch_norm(x, bn.running_mean[:width], bn.running_var[:width], bn.weight[:width], bn.bias[:width],
                             bn.training, bn.momentum, bn.eps)
        x = F.relu(x)
        return F.max_pool2d(x, 2) if self.pool else x


class Prunode(nn.Module):
    """PruNet's stochastic bi-path width choice (Kierat et al. 2022, §3.1): two masks over the
    channel dimension, ``m_small`` (the first ``small`` channels) and ``m_big`` (the first
    ``big``), with two learnable logits choosing between them. A block is computed once at
    ``big`` channels and multiplied by :meth:`mask` (``g_small m_small + g_big m_big``): with
    ``g_big = 1`` it is exactly the plain block of width ``big``, with ``g_small = 1`` the plain
    block of width ``small`` padded with zeros.

    ``candidates`` are the widths the pair may stop at (ascending); the pair is two neighbours
    ``candidates[index], candidates[index + 1]``, starting at the widest. :meth:`move` shifts it
    one candidate towards the mask whose probability reached the threshold and restarts the
    choice even (our simplification of the paper's mask schedule)."""

    def __init__(self, candidates: Sequence[int]):
        super().__init__()
        self.candidates = tuple(int(c) for c in candidates)
        if len(self.candidates) < 2 or list(self.candidates) != sorted(set(self.candidates)):
            raise ConfigError(f"a Prunode needs two or more ascending widths, got {list(self.candidates)}")
        self.register_buffer("index", torch.tensor(len(self.candidates) - 2, dtype=torch.int64))
        self.alpha = nn.Parameter(torch.zeros(2))

    @property
    def small(self) -> int:
        return self.candidates[int(self.index)]

    @property
    def big(self) -> int:
        return self.candidates[int(self.index) + 1]

    def probabilities(self) -> torch.Tensor:
        """``(p_small, p_big)``: the softmax of the two logits."""
        return torch.softmax(self.alpha, 0)

    def mask(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights[0] m_small + weights[1] m_big`` over the ``big`` channels."""
        small, big = self.small, self.big
        keep = torch.zeros(big, device=weights.device, dtype=weights.dtype)
        keep[:small] = 1.0
        return weights[0] * keep + weights[1]

    def move(self, threshold: float) -> str | None:
        """Shrink (``"shrink"``) or grow (``"grow"``) the pair by one candidate when the small /
        big mask's probability reaches ``threshold``, within the candidates; ``None`` when it
        stays. A moved pair's logits restart at zero (an even choice)."""
        p_small, p_big = (float(v) for v in self.probabilities().detach())
        i = int(self.index)
        step = -1 if p_small >= threshold and i > 0 else 1 if p_big >= threshold and i < len(self.candidates) - 2 else 0
        if not step:
            return None
        with torch.no_grad():
            self.index.add_(step)
            self.alpha.zero_()
        return "shrink" if step < 0 else "grow"

    def chosen(self) -> int:
        """The width the search settles on: the more probable mask (ties: the big one)."""
        p_small, p_big = self.probabilities().detach()
        return self.small if p_small > p_big else self.big


class StochasticLayer(nn.Module):
    """One layer of the supernet: a :class:`SuperBlock` per candidate op (plus the identity,
    :data:`SKIP`, where the layer may be skipped), one architecture logit per choice, and which
    choices (``active``) and whether the layer itself (``alive``) survive the pruning of PruNet
    §3.2-3.3. A pruned choice keeps its parameters (so a checkpoint always has the same
    structure) but is never computed again."""

    def __init__(self, ops: Sequence[str], in_max: int, out_max: int, *, pool: bool, skip: bool, batchnorm: bool,
                 flat_in: int = 1):
        super().__init__()
        self.ops = tuple(ops)
        self.choices = self.ops + ((SKIP,) if skip else ())
        self.pool, self.skippable = pool, skip
        self.blocks = nn.ModuleDict({op: SuperBlock(op, in_max, out_max, pool=pool, batchnorm=batchnorm, flat_in=flat_in)
                                     for op in self.ops})
        self.alpha = nn.Parameter(torch.zeros(len(self.choices)))
        self.register_buffer("active", torch.ones(len(self.choices), dtype=torch.bool))
        self.register_buffer("alive", torch.tensor(True))

    def logits(self) -> torch.Tensor:
        return self.alpha.masked_fill(~self.active, float("-inf"))

    def probabilities(self) -> torch.Tensor:
        """Softmax of the logits over the choices still in the layer (pruned ones: 0)."""
        return torch.softmax(self.logits(), 0)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, width: int, mask: torch.Tensor) -> torch.Tensor:
        """``mask * sum_i weights_i block_i(x, width) + weights_skip x`` over the active choices."""
        out = None
        active = self.active.tolist()
        for i, op in enumerate(self.ops):
            if active[i]:
                y = weights[i] * self.blocks[op](x, width)
                out = y if out is None else out + y
        shape = (1, -1) + (1,) * (out.dim() - 2)
        out = out * mask.view(shape)
        if self.skippable and active[-1]:
            out = out + weights[-1] * x
        return out


class Supernet(nn.Module):
    """The stochastic layers of the skeleton (module docstring), one :class:`Prunode` per stage
    and the classifier. ``forward(x, layer_weights, mask_weights)`` mixes each layer's choices
    by ``layer_weights[l]`` and each stage's masks by ``mask_weights[s]``; :class:`DNAS` draws
    them (Gumbel-softmax while searching, one-hot for the derived network)."""

    def __init__(self, settings: DNASSettings, shape: InputShape):
        super().__init__()
        self.settings, self.shape = settings, shape
        side = shape.size
        if side >> len(settings.stages) < 1:
            raise ConfigError(
                f"DNASSettings.stages has {len(settings.stages)} stages, each pooling once, which shrinks the "
                f"{side}px image to nothing; use at most {int(math.log2(side))} stages for this input")
        layers, prunodes, stage_of, geometry = [], [], [], []
        channels, in_kind = shape.channels, "image"
        for s, count in enumerate(settings.stages):
            widths = settings.conv_candidates
            prunodes.append(Prunode(widths))
            for j in range(count):
                first = j == 0
                in_max = channels if first else widths[-1]
                layers.append(StochasticLayer(settings.ops, in_max, widths[-1], pool=first, skip=settings.skip and not first,
                                              batchnorm=settings.batchnorm))
                stage_of.append(s)
                geometry.append({"kind": "conv", "side": side, "in": in_kind if first else "same"})
                if first:
                    side //= 2
            channels, in_kind = widths[-1], "conv"
        if settings.fc_layers:
            widths = settings.fc_candidates
            prunodes.append(Prunode(widths))
            for j in range(settings.fc_layers):
                first = j == 0
                flat = side * side if first else 1
                layers.append(StochasticLayer(("fc",), channels if first else widths[-1], widths[-1], pool=False,
                                              skip=settings.skip and not first, batchnorm=False, flat_in=flat))
                stage_of.append(len(prunodes) - 1)
                geometry.append({"kind": "fc", "side": side, "in": in_kind if first else "same"})
            channels, side, in_kind = widths[-1], 1, "fc"
        self.layers = nn.ModuleList(layers)
        self.prunodes = nn.ModuleList(prunodes)
        self.stage_of = tuple(stage_of)
        self.geometry = tuple(geometry)
        self.final_side = side
        self.head = nn.Linear(channels * side * side, shape.classes)

    def architecture_parameters(self) -> list[nn.Parameter]:
        return [layer.alpha for layer in self.layers] + [p.alpha for p in self.prunodes]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.architecture_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def forward(self, x: torch.Tensor, layer_weights: Sequence[torch.Tensor],
                mask_weights: Sequence[torch.Tensor]) -> torch.Tensor:
        masks = [p.mask(w) for p, w in zip(self.prunodes, mask_weights)]
        for l, layer in enumerate(self.layers):
            if self.geometry[l]["kind"] == "fc" and x.dim() > 2:
                x = x.flatten(1)
            if not bool(layer.alive):
                continue
            s = self.stage_of[l]
            x = layer(x, layer_weights[l], self.prunodes[s].big, masks[s])
        x = x.flatten(1)
        return F.linear(x, self.head.weight[:, :x.shape[1]], self.head.bias)


# -- the search -------------------------------------------------------------------------------------
class DNAS:
    """A PruNet-style search (module docstring): the supernet, its two optimizers, the Gumbel
    generator, the epoch / step counters, the pruning decisions and the :attr:`history`.

    ``DNAS(settings, shape, latency, seed=..., device=...)``, then :meth:`train_epoch` once per
    epoch (or :meth:`step` per pair of batches) until :attr:`finished`, then :meth:`derive`.
    :meth:`state_dict` / :meth:`load_state_dict` capture everything (weights, logits, masks,
    pruning, optimizers, the RNG, the latencies used), so a search resumed into a fresh object
    goes on bit for bit (for the same device and threads). Weight initialisation and Gumbel
    noise come from ``derive_seed(seed, "dnas", ...)``."""

    def __init__(self, settings: DNASSettings, shape: InputShape, latency: LatencyFn, *, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if not isinstance(settings, DNASSettings):
            raise ConfigError(f"DNAS needs DNASSettings, got {describe(settings)}")
        if not isinstance(shape, InputShape):
            raise ConfigError(f"DNAS needs an InputShape (channels, size, classes), got {describe(shape)}")
        if not callable(latency):
            raise ConfigError(f"DNAS latency must be a function latency(block, in_shape) -> seconds, got {describe(latency)}; "
                              "e.g. secateurs.search.dnas.macs_latency or LatencyTable.block_latency")
        check_int(seed, "DNAS seed")
        self.settings, self.shape, self.latency, self.seed = settings, shape, latency, seed
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "dnas", "init"))
            self.supernet = Supernet(settings, shape)
        self.supernet.to(self.device)
        self.weight_optimizer = torch.optim.SGD(self.supernet.weight_parameters(), lr=settings.weight_lr,
                                                momentum=settings.momentum, weight_decay=settings.weight_decay)
        self.arch_optimizer = torch.optim.Adam(self.supernet.architecture_parameters(), lr=settings.arch_lr,
                                               weight_decay=settings.arch_weight_decay)
        self.generator = torch.Generator().manual_seed(derive_seed(seed, "dnas", "gumbel"))
        self.epoch = 0
        self.steps = 0
        self.arch_steps = 0
        self.history: list[dict] = []
        self._latencies: dict[tuple, float] = {}
        self.reference_latency = float(self.expected_latency(uniform=True))
        if not self.reference_latency > 0:
            raise ConfigError(f"the latency function gives the starting supernet an expected latency of "
                              f"{self.reference_latency!r} s; it must give positive seconds per block")

    # -- schedule ------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.epoch >= self.settings.epochs

    def temperature(self, epoch: int | None = None) -> float:
        """Gumbel-softmax temperature of ``epoch`` (0-based; default the current one):
        exponential from ``temperature_start`` to ``temperature_end`` (FBNet §3.3 anneals it)."""
        s = self.settings
        e = self.epoch if epoch is None else epoch
        span = max(1, s.epochs - 1)
        return s.temperature_start * (s.temperature_end / s.temperature_start) ** (min(e, span) / span)

    def weight_lr(self, epoch: int | None = None) -> float:
        e = self.epoch if epoch is None else epoch
        return self.settings.weight_lr * 0.5 * (1 + math.cos(math.pi * e / self.settings.epochs))

    # -- choice weights ------------------------------------------------------------------------
    def _gumbel(self, n: int) -> torch.Tensor:
        noise = torch.empty(n).exponential_(generator=self.generator).log().neg()
        return noise.to(self.device)

    def sample_weights(self, temperature: float, *, detach: bool = False) -> tuple[list, list]:
        """Gumbel-softmax weights of every layer's choices and every Prunode's two masks."""
        net = self.supernet
        layer_w, mask_w = [], []
        for layer in net.layers:
            logits = layer.logits()
            logits = logits.detach() if detach else logits
            layer_w.append(torch.softmax((logits + self._gumbel(len(layer.choices))) / temperature, 0))
        for prunode in net.prunodes:
            alpha = prunode.alpha.detach() if detach else prunode.alpha
            mask_w.append(torch.softmax((alpha + self._gumbel(2)) / temperature, 0))
        return layer_w, mask_w

    def argmax_weights(self) -> tuple[list, list]:
        """One-hot weights of the derived network: each layer's most probable choice and each
        Prunode's more probable mask."""
        layer_w, mask_w = [], []
        for layer in self.supernet.layers:
            p = layer.probabilities().detach()
            layer_w.append(F.one_hot(p.argmax(), len(p)).to(p.dtype))
        for prunode in self.supernet.prunodes:
            big = prunode.chosen() == prunode.big
            mask_w.append(torch.tensor([0.0, 1.0] if big else [1.0, 0.0], device=self.device))
        return layer_w, mask_w

    # -- latency -------------------------------------------------------------------------------
    def _measured(self, op: str, width: int, pool: bool, in_shape: tuple[int, ...]) -> float:
        key = (op, width, pool, in_shape)
        value = self._latencies.get(key)
        if value is None:
            value = self.latency(Block(op, width, pool), in_shape)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"the latency function gave {describe(value)} for {Block(op, width, pool).label} at "
                                  f"input {in_shape}; it must return finite seconds >= 0")
            value = self._latencies[key] = float(value)
        return value

    def block_latency(self, l: int, op: str, in_width: int, width: int) -> float:
        """Latency of layer ``l``'s ``op`` from ``in_width`` channels (features) to ``width``:
        measured where both are measured widths, else the bilinear interpolation of the four
        measured neighbours (the latency is called only at measured widths)."""
        if op == SKIP:
            return 0.0
        s, net = self.settings, self.supernet
        geo = net.geometry[l]
        kind, side, source = geo["kind"], geo["side"], geo["in"]
        out_grid = s.widths if kind == "conv" else s.fc_widths
        if source == "image":
            in_grid = (self.shape.channels,)
        elif source == "conv":
            in_grid = s.widths
        elif source == "fc":
            in_grid = s.fc_widths
        else:  # same stage: the input is this stage's width
            in_grid = out_grid
        pool = net.layers[l].pool

        def shape_of(c: int) -> tuple[int, ...]:
            if kind == "conv":
                return (c, side, side)
            return (c * side * side,) if source in ("conv", "image") else (c,)

        total = 0.0
        for c, wc in _bracket(in_grid, in_width):
            for w, ww in _bracket(out_grid, width):
                total += wc * ww * self._measured(op, w, pool, shape_of(c))
        return total

    def expected_latency(self, *, uniform: bool = False) -> torch.Tensor:
        """The supernet's expected latency in seconds, differentiable in the architecture logits:
        over the layers still alive, the sum of choice probability x Prunode mask probability
        (x the previous stage's mask probability, for a stage's first layer, whose input width
        is the previous stage's) x block latency. ``uniform``: every choice equally likely."""
        net = self.supernet
        probs = []
        for p in net.prunodes:
            q = torch.full((2,), 0.5, device=self.device) if uniform else p.probabilities()
            probs.append(((p.small, q[0]), (p.big, q[1])))
        total = torch.zeros((), device=self.device)
        for l, layer in enumerate(net.layers):
            if not bool(layer.alive):
                continue
            if uniform:
                act = layer.active.float()
                p_choice = act / act.sum()
            else:
                p_choice = layer.probabilities()
            s = net.stage_of[l]
            source = net.geometry[l]["in"]
            first = source != "same"
            if not first:
                inputs = None
            elif source == "image":
                inputs = ((self.shape.channels, torch.ones((), device=self.device)),)
            else:
                inputs = probs[s - 1]
            for i, op in enumerate(layer.choices):
                if op == SKIP or not bool(layer.active[i]):
                    continue
                for w, q in probs[s]:
                    if inputs is None:
                        total = total + p_choice[i] * q * self.block_latency(l, op, w, w)
                    else:
                        for c, qc in inputs:
                            total = total + p_choice[i] * q * qc * self.block_latency(l, op, c, w)
        return total

    def predicted_latency(self, arch: Architecture | None = None) -> float:
        """Latency of ``arch`` (default: :meth:`derive`'s) as the search counts it: the sum of
        its blocks' latencies (interpolated as in :meth:`block_latency`). Equals the expected
        latency once every choice is certain."""
        arch = self.derive() if arch is None else arch
        layers = self._derived_layers()
        if arch != self._architecture(layers):
            raise ConfigError("predicted_latency reads the skeleton of this search; pass its derive() (or None)")
        total, prev = 0.0, self.shape.channels
        for l, op, width in layers:
            # a stage's first layer (always kept) reads the previous stage's width, the others their own
            first = self.supernet.geometry[l]["in"] != "same"
            total += self.block_latency(l, op, prev if first else width, width)
            prev = width
        return total

    def _loss_latency(self) -> torch.Tensor:
        s = self.settings
        lat = self.expected_latency()
        if s.latency_target is None:
            return lat / self.reference_latency
        return F.relu(lat / s.latency_target - 1.0)

    # -- training ------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, x_arch: torch.Tensor | None = None,
             y_arch: torch.Tensor | None = None) -> dict:
        """One weight step on ``(x, y)`` (choices sampled, logits fixed), then, when given and
        past the warm-up, one architecture step on ``(x_arch, y_arch)`` (cross-entropy + the
        latency term; weights fixed), then the Prunode mask moves."""
        net, tau = self.supernet, self.temperature()
        net.train()
        x, y = x.to(self.device), y.to(self.device)
        layer_w, mask_w = self.sample_weights(tau, detach=True)
        logits = net(x, layer_w, mask_w)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the supernet's loss is {loss.item()} at step {self.steps}; lower weight_lr")
        self.weight_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.weight_optimizer.step()
        self.steps += 1
        out = {"loss": float(loss.detach()), "correct": int((logits.argmax(1) == y).sum()), "count": len(y)}
        if x_arch is not None and self.epoch >= self.settings.warmup_epochs:
            out.update(self._arch_step(x_arch.to(self.device), y_arch.to(self.device), tau))
        return out

    def _arch_step(self, x: torch.Tensor, y: torch.Tensor, tau: float) -> dict:
        net = self.supernet
        params = net.architecture_parameters()
        layer_w, mask_w = self.sample_weights(tau)
        ce = F.cross_entropy(net(x, layer_w, mask_w), y)
        penalty = self._loss_latency()
        loss = ce + self.settings.latency_weight * penalty
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        self.arch_optimizer.step()
        self.arch_optimizer.zero_grad(set_to_none=True)
        self.arch_steps += 1
        moves = []
        for i, prunode in enumerate(net.prunodes):
            move = prunode.move(self.settings.prunode_threshold)
            if move:
                moves.append({"stage": i, "move": move, "small": prunode.small, "big": prunode.big})
        return {"arch_loss": float(ce.detach()), "latency_penalty": float(penalty.detach()), "moves": moves}

    def train_epoch(self, batches: Iterable, arch_batches: Iterable | None = None) -> dict:
        """One epoch: a weight step per batch of ``batches`` and, past ``warmup_epochs``, an
        architecture step on the next batch of ``arch_batches`` after every ``ceil(len(batches)
        / len(arch_batches))`` weight steps (so both sets are used once; FBNet's alternation on
        an 80 / 20 split). Without ``arch_batches`` each batch is split in halves, the first for
        the weights and the second for the architecture. Then, past ``prune_warmup_epochs``,
        the block and layer pruning; returns the epoch's :attr:`history` record."""
        if self.finished:
            raise ConfigError(f"the search has run its {self.settings.epochs} epochs; derive() the result, or raise "
                              "DNASSettings.epochs in a new search")
        lr = self.weight_lr()
        for group in self.weight_optimizer.param_groups:
            group["lr"] = lr
        searching = self.epoch >= self.settings.warmup_epochs
        every = 1
        if arch_batches is not None and hasattr(batches, "__len__") and hasattr(arch_batches, "__len__") and len(arch_batches):
            every = max(1, math.ceil(len(batches) / len(arch_batches)))
        arch_iter = iter(arch_batches) if (arch_batches is not None and searching) else None
        totals = {"loss": 0.0, "correct": 0, "count": 0, "arch_loss": 0.0, "arch_steps": 0, "batches": 0}
        moves = []
        for i, (x, y) in enumerate(batches):
            x_arch = y_arch = None
            if arch_batches is None and searching:
                half = len(y) // 2
                if half == 0:
                    raise ConfigError("a batch of one example cannot be split into weight and architecture halves; "
                                      "pass arch_batches or a batch size of 2 or more")
                x, y, x_arch, y_arch = x[:half], y[:half], x[half:], y[half:]
            elif arch_iter is not None and (i + 1) % every == 0:
                nxt = next(arch_iter, None)
                if nxt is not None:
                    x_arch, y_arch = nxt
            out = self.step(x, y, x_arch, y_arch)
            totals["loss"] += out["loss"] * out["count"]
            totals["correct"] += out["correct"]
            totals["count"] += out["count"]
            totals["batches"] += 1
            if "arch_loss" in out:
                totals["arch_loss"] += out["arch_loss"]
                totals["arch_steps"] += 1
                moves += [{**m, "step": self.arch_steps} for m in out["moves"]]
        if not totals["count"]:
            raise ConfigError("train_epoch got no batches; pass the training batches (an iterable of (x, y))")
        self.epoch += 1
        pruned_blocks = pruned_layers = []
        if self.epoch > self.settings.prune_warmup_epochs:
            pruned_blocks = self.prune_blocks()
            pruned_layers = self.prune_layers()
        record = {
            "epoch": self.epoch, "temperature": self.temperature(self.epoch - 1), "weight_lr": lr,
            "loss": totals["loss"] / totals["count"], "train_acc": totals["correct"] / totals["count"],
            "arch_loss": totals["arch_loss"] / totals["arch_steps"] if totals["arch_steps"] else None,
            "arch_steps": totals["arch_steps"], "expected_latency": float(self.expected_latency().detach()),
            "prunode_moves": moves, "pruned_blocks": pruned_blocks, "pruned_layers": pruned_layers,
            **self.snapshot(),
        }
        self.history.append(record)
        return record

    # -- pruning -------------------------------------------------------------------------------
    def prune_blocks(self) -> list[dict]:
        """PruNet §3.2: in every layer still alive, remove each choice whose probability (softmax
        over the choices left) is below ``block_threshold``; the most probable choice is never
        removed, and neither is the last computing block (a layer keeps one block besides the
        skip). Returns what was removed: ``[{"layer", "choice", "p"}]``."""
        out = []
        threshold = self.settings.block_threshold
        for l, layer in enumerate(self.supernet.layers):
            if not bool(layer.alive):
                continue
            p = layer.probabilities().detach()
            best = int(p.argmax())
            ops = [i for i, c in enumerate(layer.choices) if c != SKIP and bool(layer.active[i])]
            best_op = max(ops, key=lambda i: (float(p[i]), -i))
            for i, choice in enumerate(layer.choices):
                if not bool(layer.active[i]) or i in (best, best_op) or float(p[i]) >= threshold:
                    continue
                layer.active[i] = False
                out.append({"layer": l, "choice": choice, "p": float(p[i])})
        return out

    def prune_layers(self) -> list[dict]:
        """PruNet §3.3: remove every layer whose skip probability is at least
        ``layer_threshold`` (it becomes the identity and is never computed again). Returns
        ``[{"layer", "p_skip"}]``."""
        out = []
        for l, layer in enumerate(self.supernet.layers):
            if not bool(layer.alive) or not layer.skippable or not bool(layer.active[-1]):
                continue
            p_skip = float(layer.probabilities().detach()[-1])
            if p_skip >= self.settings.layer_threshold:
                layer.alive.fill_(False)
                out.append({"layer": l, "p_skip": p_skip})
        return out

    # -- the result ----------------------------------------------------------------------------
    def _derived_layers(self) -> list[tuple[int, str, int]]:
        """``(layer, op, width)`` of every layer the derived network keeps."""
        net, out = self.supernet, []
        for l, layer in enumerate(net.layers):
            if not bool(layer.alive):
                continue
            choice = layer.choices[int(layer.probabilities().detach().argmax())]
            if choice != SKIP:
                out.append((l, choice, net.prunodes[net.stage_of[l]].chosen()))
        return out

    def _architecture(self, layers) -> Architecture:
        return Architecture(tuple(Block(op, width, self.supernet.layers[l].pool) for l, op, width in layers))

    def derive(self) -> Architecture:
        """The searched network as a plain chain of :class:`~.space.Block` s: in every layer
        still alive its most probable choice (layers whose most probable choice is the skip are
        dropped), at its stage's chosen Prunode width; the first layer of each conv stage pools.
        Retrain it from scratch with :func:`.space.build`."""
        return self._architecture(self._derived_layers())

    def snapshot(self) -> dict:
        """The search's state in plain values: per layer its choices' probabilities (pruned
        choices absent, pruned layers ``None``), per stage the Prunode pair and probabilities,
        and the network :meth:`derive` gives now."""
        net = self.supernet
        layers = []
        for layer in net.layers:
            if not bool(layer.alive):
                layers.append(None)
                continue
            p = layer.probabilities().detach().cpu().tolist()
            layers.append({c: p[i] for i, c in enumerate(layer.choices) if bool(layer.active[i])})
        stages = []
        for pr in net.prunodes:
            q = pr.probabilities().detach().cpu().tolist()
            stages.append({"small": pr.small, "big": pr.big, "p_small": q[0], "p_big": q[1]})
        return {"probabilities": layers, "prunodes": stages, "derived": self.derive().label}

    @torch.no_grad()
    def evaluate(self, batches: Iterable) -> float:
        """Accuracy of the derived network *inside the supernet* (one-hot choices, shared
        weights and batch-norm statistics, no retraining): a check that the search learned, not
        the derived network's accuracy."""
        net = self.supernet
        was = net.training
        net.eval()
        layer_w, mask_w = self.argmax_weights()
        correct = count = 0
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            correct += int((net(x, layer_w, mask_w).argmax(1) == y).sum())
            count += len(y)
        net.train(was)
        return correct / max(1, count)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed search needs to go on bit for bit."""
        return {
            "format": _FORMAT, "settings": self.settings.to_dict(), "shape": dataclasses.asdict(self.shape),
            "seed": self.seed, "epoch": self.epoch, "steps": self.steps, "arch_steps": self.arch_steps,
            "supernet": self.supernet.state_dict(), "weight_optimizer": self.weight_optimizer.state_dict(),
            "arch_optimizer": self.arch_optimizer.state_dict(), "generator": self.generator.get_state(),
            "history": [dict(r) for r in self.history], "latencies": dict(self._latencies),
            "reference_latency": self.reference_latency,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output into this search, which must have the same
        settings, input shape and seed (a :class:`CheckpointError` says which differs)."""
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise CheckpointError("this is not a DNAS search state; pass what DNAS.state_dict() returned")
        mine = {"settings": self.settings.to_dict(), "shape": dataclasses.asdict(self.shape), "seed": self.seed}
        differ = [k for k, v in mine.items() if state.get(k) != v]
        if differ:
            raise CheckpointError(f"the DNAS state is from a search with another {', '.join(differ)}; resume it with "
                                  "the settings, input shape and seed it was made with, or start a new search")
        self.supernet.load_state_dict(state["supernet"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.arch_optimizer.load_state_dict(state["arch_optimizer"])
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8).cpu())
        self.epoch, self.steps, self.arch_steps = int(state["epoch"]), int(state["steps"]), int(state["arch_steps"])
        self.history = [dict(r) for r in state["history"]]
        self._latencies = dict(state["latencies"])
        self.reference_latency = float(state["reference_latency"])


def _bracket(grid: Sequence[int], value: int) -> list[tuple[int, float]]:
    """``value`` as a weighted pair of its neighbours in ``grid`` (itself if measured)."""
    grid = sorted(grid)
    if value in grid:
        return [(value, 1.0)]
    if value < grid[0] or value > grid[-1]:
        raise ConfigError(f"width {value} is outside the measured widths {grid}; the latency cannot be interpolated")
    hi = next(i for i, g in enumerate(grid) if g > value)
    a, b = grid[hi - 1], grid[hi]
    t = (value - a) / (b - a)
    return [(a, 1.0 - t), (b, t)]
