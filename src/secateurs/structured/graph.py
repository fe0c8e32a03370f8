"""Dependency graph of coupled channels: which slices of which tensors must be pruned together.

Removing output channel ``k`` of a conv is only legal if the same ``k`` disappears from the
BatchNorm after it, from the input channels of every layer that reads it, and from every
branch that is summed with it in a residual connection. Following Torch-Pruning's idea of
a *group* of coupled slices (Fang et al., 2023, "DepGraph"), we trace the model with
``torch.fx``, run the example input through it for shapes, and label every position of
every tensor's channel dimension (dim 1) with an *atom*: the output channel of the layer
that produced it. Operations move labels (flatten repeats each label H*W times, ``cat``
concatenates them, a channel ``F.pad`` adds constant atoms) or join them (a residual
``add`` unites the atoms of its two inputs position by position). Atoms that end up joined
form one *unit* (one channel to keep or remove); units whose atoms share a producer form
one :class:`Group`.

Anything the tracker does not understand freezes the atoms it touches, with the reason
kept on the frozen group, so pruning is conservative: it never edits a layer whose
coupling it cannot prove.

Supported: Conv1d/2d/3d (plain or depthwise), Linear on 2-D inputs, BatchNorm1d/2d/3d,
ReLU-like activations, pooling and spatial padding (over dims after the channel axis only),
dropout, flatten / ``view(n, -1)``, spatial indexing, ``cat``, broadcasting ``add`` / ``mul`` /
``div``, spatial ``mean`` and channel ``F.pad``.
ResNet option-A shortcuts (He et al., 2016) pad the subsampled input with zero channels:
input channel ``i`` is summed with block output channel ``i`` (they are joined), and the
padded channels are constant atoms joined with the remaining outputs, so pruning a padded
position shrinks the pad. Frozen: the network input and output channels, general grouped
convs (removing channels would unbalance the groups), reshapes with literal channel counts,
user-excluded modules and every unknown op.
"""
from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import ConfigError
from ..outputs import call_model, model_failure

__all__ = ["Slice", "Group", "PadSite", "DependencyGraph", "build_graph", "build_groups", "trace"]

Labels = list  # list[Optional[int]]: one atom (or None for "untracked") per position of dim 1

#: Roles of a slice: which dimension of which tensors of the module it indexes.
#: ``out``: conv/linear output channels (weight dim 0, bias); ``in``: their input channels
#: (weight dim 1); ``bn``: every per-channel tensor of a BatchNorm; ``depthwise``: a
#: depthwise conv whose channels are its input channels (weight dim 0, bias, groups).
ROLE_DIMS: dict[str, int] = {"out": 0, "in": 1, "bn": 0, "depthwise": 0, "ln": 0}
# plus "param:<attribute>:<dim>": a module's own per-channel parameter (ConvNeXt's layer scale)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Shape-preserving on dim 1 and f(0) = 0, so a zero channel stays zero through them.
_ZERO_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish, nn.Mish,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    # spatial padding: the channel dimension is untouched (the passthrough checks it)
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)
# Channel-wise but f(0) != 0: fine to prune through, not to compact through.
_NONZERO_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_ZERO_KEEPING_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.mish,
    torch.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
# Pooling and spatial padding act on the trailing k dims of their input: the tracked channel
# axis must lie before them, else they mix (or shift) channels while keeping their count.
_TRAILING_DIMS: dict[Any, int] = {
    op: k
    for k, ops in {
        1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.ZeroPad1d, nn.ReflectionPad1d,
            nn.ReplicationPad1d, F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d),
        2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d, nn.ReflectionPad2d,
            nn.ReplicationPad2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d),
        3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.ZeroPad3d, nn.ReflectionPad3d,
            nn.ReplicationPad3d, F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d),
    }.items()
    for op in ops
}
_KNOWN_MODULES: tuple[type[nn.Module], ...] = (*_CONV, *_BN, nn.Linear, nn.Flatten, *_ZERO_KEEPING_MODULES, *_NONZERO_MODULES)
_NONZERO_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus}
_ZERO_KEEPING_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "detach"}
_NONZERO_METHODS = {"sigmoid", "sigmoid_"}
_SHAPE_QUERIES_F = {getattr}
_SHAPE_QUERIES_M = {"size", "dim", "numel"}
_ADD = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul}
_DIV = {operator.truediv, operator.itruediv, torch.div}
_ADD_M = {"add", "add_", "sub", "sub_"}
_MUL_M = {"mul", "mul_"}
_DIV_M = {"div", "div_"}
_CAT = {torch.cat, torch.concat, torch.concatenate}


@dataclass(frozen=True)
class Slice:
    """The indices one group owns along one dimension of one module's tensors.

    ``indices[u]`` are the positions along ``dim`` (of ``ROLE_DIMS[role]``) that unit ``u``
    of the group occupies: one for a conv channel, ``H*W`` for a channel flattened into a
    linear layer.
    """

    module: str
    role: str
    indices: tuple[tuple[int, ...], ...]

    @property
    def dim(self) -> int:
        if self.role.startswith("param:"):
            return int(self.role.rsplit(":", 1)[1])
        return ROLE_DIMS[self.role]


@dataclass(frozen=True)
class Group:
    """Coupled channels that can only be removed together; the unit of structured pruning.

    ``units`` is the number of channels; removing unit ``u`` removes ``slice.indices[u]``
    from every slice. ``frozen`` says why a group may not be pruned (``None`` if it may).
    """

    name: str
    units: int
    slices: tuple[Slice, ...]
    frozen: Optional[str] = None

    @property
    def producers(self) -> tuple[str, ...]:
        """Modules whose output channels (or depthwise channels) are this group's units."""
        return tuple(s.module for s in self.slices if s.role in ("out", "depthwise"))

    def slices_of(self, module: str) -> tuple[Slice, ...]:
        return tuple(s for s in self.slices if s.module == module)


@dataclass(frozen=True)
class PadSite:
    """A constant ``F.pad`` on channels (ResNet option-A shortcut): its amounts follow pruning.

    ``before`` / ``after`` give, for each padded channel, the ``(group, unit)`` it is summed
    with (``None`` if it is joined to nothing); ``owner`` is the module whose ``forward`` calls
    ``F.pad`` and ``ordinal`` counts the channel pads of that ``forward``.
    """

    node: str
    owner: str
    ordinal: int
    position: int  # index in the pad tuple of the channel pair's first entry
    before: tuple[Optional[tuple[str, int]], ...]
    after: tuple[Optional[tuple[str, int]], ...]


@dataclass
class DependencyGraph:
    """Groups of a traced model plus the per-index owners needed to cut tensors."""

    groups: list[Group]
    owners: dict[tuple[str, str], list[Optional[tuple[str, int]]]]
    pads: list[PadSite]
    unsafe_to_compact: dict[str, frozenset[int]] = field(default_factory=dict)
    #: how the graph was captured: "fx" (symbolic trace) or "run" (recorded while running)
    capture: str = "fx"

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.frozen is None]

    @property
    def frozen(self) -> dict[str, str]:
        return {g.name: g.frozen for g in self.groups if g.frozen is not None}

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise ConfigError(
            f"no group named {name!r}; groups are named after their first producer: "
            f"{', '.join(g.name for g in self.prunable) or '(none prunable)'}"
        )


def matches(name: str, patterns: Iterable[str]) -> bool:
    """``fnmatch`` on the module name, or the name lies under a pattern naming a parent."""
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


class _Tracer(fx.Tracer):
    """fx tracer that remembers the innermost module whose forward failed to trace, and
    treats excluded (non-torch.nn) modules as opaque leaves."""

    def __init__(self, exclude: Sequence[str]):
        super().__init__()
        self.exclude = tuple(exclude)
        self.failed_in: Optional[tuple[str, str]] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name and matches(module_qualified_name, self.exclude):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


def trace(model: nn.Module, exclude: Sequence[str] = ()) -> fx.GraphModule:
    """``torch.fx`` trace with an error that names the module that cannot be traced."""
    tracer = _Tracer(exclude)
    try:
        graph = tracer.trace(model)
    except Exception as err:
        where = tracer.failed_in
        place = (
            f"inside module {where[0]!r} ({where[1]})" if where and where[0]
            else f"in the forward of {type(model).__name__} itself"
        )
        raise ConfigError(
            f"torch.fx cannot trace the model {place}: {type(err).__name__}: {err}. "
            f"Structured pruning needs a static graph; pass exclude=[{(where or ('',))[0]!r}] to "
            f"keep that module whole (it is then treated as an opaque leaf and left untouched), "
            f"or rewrite its data-dependent control flow."
        ) from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _shape(node: Any) -> Optional[tuple[int, ...]]:
    if not isinstance(node, fx.Node):
        return None
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(shape) if shape is not None else None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


class _Tracker:
    """Walks the traced graph once, labelling channel positions with atoms (union-find)."""

    def __init__(self, gm: fx.GraphModule, exclude: Sequence[str]):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.exclude = tuple(exclude)
        self.parent: list[int] = []
        self.site: list[str] = []
        self.blocked: dict[int, str] = {}
        self.nonzero: set[int] = set()
        self.labels: dict[fx.Node, Optional[Labels]] = {}
        self.index_atoms: dict[tuple[str, str], Labels] = {}
        self.module_out: dict[str, Labels] = {}
        self.pads: list[tuple[fx.Node, str, int, int, Labels, Labels]] = []
        self.pad_count: dict[str, int] = {}
        #: the axis a node's labels run along (1 unless a permute moved the channels, as
        #: ConvNeXt does around its channels-last LayerNorm and Linear layers)
        self.axes: dict[fx.Node, int] = {}

    # ---- union-find over atoms -------------------------------------------------------
    def fresh(self, n: int, site: str, reason: Optional[str] = None) -> Labels:
        start = len(self.parent)
        atoms = list(range(start, start + n))
        self.parent.extend(atoms)
        self.site.extend([site] * n)
        if reason:
            self.block(atoms, reason)
        return atoms

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: Optional[int], b: Optional[int]) -> None:
        if a is None or b is None:
            return
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def block(self, labels: Optional[Iterable[Optional[int]]], reason: str) -> None:
        for a in labels or ():
            if a is not None:
                self.blocked.setdefault(a, reason)

    def record(self, module: str, role: str, labels: Labels) -> None:
        """Remember which atom each index of ``module``'s ``role`` dimension carries; a
        module called twice shares its weights, so the two calls' atoms are joined."""
        key = (module, role)
        if key in self.index_atoms:
            for a, b in zip(self.index_atoms[key], labels):
                self.union(a, b)
        else:
            self.index_atoms[key] = list(labels)

    # ---- helpers -----------------------------------------------------------------------
    def of(self, node: Any) -> Optional[Labels]:
        return self.labels.get(node) if isinstance(node, fx.Node) else None

    def ax(self, node: Any) -> int:
        return self.axes.get(node, 1) if isinstance(node, fx.Node) else 1

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
        return [n for n in found if _shape(n) is not None]

    def output_labels(self, node: fx.Node, reason: str) -> Optional[Labels]:
        """Fresh frozen atoms for a tensor output we cannot relate to its inputs."""
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        site = str(node.target) if node.op == "call_module" else node.name
        return self.fresh(shape[1], site, reason)

    def unknown(self, node: fx.Node, what: str) -> Optional[Labels]:
        reason = f"{what} at node {node.name!r} is not understood by the channel tracker"
        for n in self.tensor_inputs(node):
            self.block(self.of(n), reason)
        return self.output_labels(node, reason)

    def passthrough(self, node: fx.Node, x: Any, zero_keeping: bool, what: str) -> Optional[Labels]:
        shape_in, shape_out, labels, axis = _shape(x), _shape(node), self.of(x), self.ax(x)
        if (labels is None or shape_in is None or shape_out is None or len(shape_out) != len(shape_in)
                or shape_out[axis] != shape_in[axis]):
            return self.unknown(node, what)
        op = type(self.modules[node.target]) if node.op == "call_module" else node.target
        trailing = _TRAILING_DIMS.get(op) if node.op != "call_method" else None
        if trailing is not None and axis >= len(shape_in) - trailing:
            # e.g. a pool after a permute, or a 2-D pool given a 3-D tensor: it pools across the channels
            return self.unknown(node, f"{what} across the channel axis (it acts on the last {trailing} dims)")
        if not zero_keeping:
            self.nonzero.update(a for a in labels if a is not None)
        self.axes[node] = axis
        return labels

    def permute(self, node: fx.Node) -> Optional[Labels]:
        """A permutation moves the channel axis; the labels go with it."""
        x, dims = node.args[0], node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        shape, labels = _shape(x), self.of(x)
        if shape is None or labels is None or not all(isinstance(d, int) for d in dims) or len(dims) != len(shape):
            return self.unknown(node, "permute")
        dims = [d % len(shape) for d in dims]
        if dims[0] != 0:
            return self.unknown(node, "permute of the batch dimension")
        self.axes[node] = dims.index(self.ax(x))
        return labels

    def layer_norm(self, node: fx.Node, x: Any, owner: str, size: int) -> Optional[Labels]:
        """LayerNorm over the channel axis (the last one): its per-channel weight and bias
        follow the channels, but the statistics mix them, so it is not zero-keeping."""
        shape, labels, axis = _shape(x), self.of(x), self.ax(x)
        if shape is None or labels is None or axis != len(shape) - 1 or len(labels) != size:
            return self.unknown(node, f"layer norm {owner!r} over a non-channel axis")
        self.record(owner, "ln", labels)
        self.nonzero.update(a for a in labels if a is not None)
        self.axes[node] = axis
        return labels

    # ---- the walk ----------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            moved = [n for n in self.tensor_inputs(node) if self.of(n) is not None and self.ax(n) != 1]
            if moved and not self._axis_aware(node):
                self.labels[node] = self.unknown(node, f"{node.op} {node.target} on channels moved to another axis")
                continue
            self.labels[node] = self.visit(node)

    def _axis_aware(self, node: fx.Node) -> bool:
        f = node.target
        if node.op == "call_module":
            m = self.modules[node.target]
            return isinstance(m, (nn.Linear, *_ZERO_KEEPING_MODULES, *_NONZERO_MODULES)) or type(m) is nn.LayerNorm
        if node.op == "call_method":
            return f in ("permute", *_ZERO_KEEPING_METHODS, *_NONZERO_METHODS, *_ADD_M, *_MUL_M, *_DIV_M)
        if node.op == "call_function":
            return (f in _ZERO_KEEPING_FUNCTIONS or f in _NONZERO_FUNCTIONS or f in _ADD or f in _MUL
                    or f in _DIV or f is F.layer_norm)
        return node.op == "output"

    def visit(self, node: fx.Node) -> Optional[Labels]:
        if node.op == "placeholder":
            return self.output_labels(node, "the network input's channels are fixed")
        if node.op == "get_attr":
            return None
        if node.op == "output":
            for n in self.tensor_inputs(node):
                self.block(self.of(n), "the network output's channels are fixed")
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        if node.op == "call_function":
            return self.visit_function(node)
        if node.op == "call_method":
            return self.visit_method(node)
        return self.unknown(node, f"operation {node.op}")

    def visit_module(self, node: fx.Node, m: nn.Module) -> Optional[Labels]:
        name = str(node.target)
        x = node.args[0] if node.args else None
        if matches(name, self.exclude):
            reason = f"module {name!r} is excluded by the user"
            for n in self.tensor_inputs(node):
                self.block(self.of(n), reason)
            return self.output_labels(node, reason)
        if isinstance(m, _CONV):
            return self.conv(node, name, m, x)
        if isinstance(m, nn.Linear):
            return self.linear(node, name, m, x)
        if isinstance(m, _BN):
            labels = self.passthrough(node, x, True, f"{type(m).__name__} {name!r}")
            if labels is not None and self.of(x) is labels:
                self.record(name, "bn", labels)
            return labels
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if type(m) is nn.LayerNorm and m.elementwise_affine and len(m.normalized_shape) == 1:
            return self.layer_norm(node, x, name, m.normalized_shape[0])
        if isinstance(m, _ZERO_KEEPING_MODULES):
            return self.passthrough(node, x, True, f"{type(m).__name__} {name!r}")
        if isinstance(m, _NONZERO_MODULES):
            return self.passthrough(node, x, False, f"{type(m).__name__} {name!r}")
        return self.unknown(node, f"module {name!r} ({type(m).__name__})")

    def conv(self, node: fx.Node, name: str, m: nn.Module, x: Any) -> Optional[Labels]:
        labels = self.of(x)
        if labels is None or len(labels) != m.in_channels:
            return self.unknown(node, f"conv {name!r}")
        if m.groups == 1:
            self.record(name, "in", labels)
            out = self.module_out.setdefault(name, self.fresh(m.out_channels, name))
            self.record(name, "out", out)
            return out
        if m.groups == m.in_channels == m.out_channels:
            # depthwise: channel c of the output only reads channel c of the input
            self.record(name, "depthwise", labels)
            return labels
        reason = (
            f"grouped conv {name!r} (groups={m.groups}, {m.in_channels}->{m.out_channels} "
            f"channels) is not pruned: removing channels would unbalance its groups; only "
            f"depthwise convs (groups == in == out channels) are supported"
        )
        self.block(labels, reason)
        return self.output_labels(node, reason)

    def linear(self, node: fx.Node, name: str, m: nn.Linear, x: Any) -> Optional[Labels]:
        labels, shape = self.of(x), _shape(x)
        if (labels is None or shape is None or len(labels) != m.in_features
                or self.ax(x) != len(shape) - 1):
            return self.unknown(node, f"linear {name!r} whose input features are not the tracked channels")
        self.record(name, "in", labels)
        out = self.module_out.setdefault(name, self.fresh(m.out_features, name))
        self.record(name, "out", out)
        self.axes[node] = len(shape) - 1
        return out

    def flatten(self, node: fx.Node, x: Any, start: int, end: int) -> Optional[Labels]:
        shape, labels = _shape(x), self.of(x)
        if shape is None or labels is None:
            return self.unknown(node, "flatten")
        start, end = start % len(shape), end % len(shape)
        if start >= 2 or start > end:
            return labels
        if start == 1:
            repeat = math.prod(shape[2 : end + 1])
            return [a for a in labels for _ in range(repeat)]
        return self.unknown(node, "flatten over the batch dimension")

    def reshape(self, node: fx.Node) -> Optional[Labels]:
        """``x.view(x.size(0), -1)`` is a flatten; a literal channel count is not prunable."""
        x = node.args[0]
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        shape_in, shape_out = _shape(x), _shape(node)
        literal = [s for i, s in enumerate(sizes) if i >= 1 and isinstance(s, int) and s != -1]
        if shape_in is None or shape_out is None or literal or len(shape_out) < 2:
            return self.unknown(node, f"{node.target} with fixed sizes {list(sizes)}")
        if shape_out[0] != shape_in[0]:
            return self.unknown(node, f"{node.target} across the batch dimension")
        if shape_out[1] == shape_in[1]:
            return self.of(x)
        if len(shape_out) == 2 and shape_out[1] == math.prod(shape_in[1:]):
            return self.flatten(node, x, 1, -1)
        return self.unknown(node, f"{node.target} to {list(shape_out)}")

    def elementwise(self, node: fx.Node, operands: Sequence[Any], kind: str) -> Optional[Labels]:
        """Broadcasting arithmetic: same-size channel dims are coupled position by position."""
        out = _shape(node)
        if out is None or len(out) < 2:
            return self.unknown(node, f"{kind} with a non-tensor or 1-D result")
        joined: list[Labels] = []
        constant_term = False
        tracked = [op for op in operands if self.of(op) is not None]
        axis = self.ax(tracked[0]) if tracked else 1
        if any(self.ax(op) != axis for op in tracked):
            return self.unknown(node, f"{kind} of tensors whose channels run along different axes")
        params: list[tuple[fx.Node, int]] = []
        for i, op in enumerate(operands):
            shape = _shape(op)
            if shape is None:  # python scalar
                constant_term = constant_term or (kind == "add" and op != 0)
                continue
            offset = len(out) - len(shape)
            dim1 = axis - offset
            if dim1 < 0 or shape[dim1] == 1:  # does not reach the channel axis, or broadcast over it
                constant_term = True
                continue
            labels = self.of(op)
            if labels is None and isinstance(op, fx.Node) and op.op == "get_attr" and kind == "mul" \
                    and shape[dim1] == out[axis] and math.prod(shape) == shape[dim1]:
                params.append((op, dim1))  # a per-channel scale (ConvNeXt's layer scale)
                continue
            if labels is None or offset != 0 or len(labels) != out[axis]:
                return self.unknown(node, f"{kind} with an untracked per-channel tensor")
            if kind == "div" and i > 0:
                self.nonzero.update(a for a in labels if a is not None)
            joined.append(labels)
        if not joined:
            return self.unknown(node, kind)
        result = []
        for column in zip(*joined):
            atoms = [a for a in column if a is not None]
            for a in atoms[1:]:
                self.union(atoms[0], a)
            result.append(atoms[0] if atoms else None)
        if constant_term and kind == "add":
            self.nonzero.update(a for a in result if a is not None)
        for param, dim in params:
            owner, _, attr = str(param.target).rpartition(".")
            self.record(owner, f"param:{attr}:{dim}", result)
        self.axes[node] = axis
        return result

    def cat(self, node: fx.Node) -> Optional[Labels]:
        tensors = list(_arg(node, 0, "tensors", ()))
        out = _shape(node)
        if out is None or any(self.of(t) is None for t in tensors):
            return self.unknown(node, "cat")
        dim = _arg(node, 1, "dim", 0) % len(out)
        if dim == 1:
            return [a for t in tensors for a in self.of(t)]  # type: ignore[union-attr]
        return self.elementwise(node, tensors, "cat")

    def getitem(self, node: fx.Node) -> Optional[Labels]:
        x, index = node.args[0], node.args[1]
        shape = _shape(x)
        if shape is None:
            return None  # indexing a tuple / a size
        index = index if isinstance(index, tuple) else (index,)
        full = slice(None, None, None)
        simple = all(isinstance(i, (slice, int, type(Ellipsis))) for i in index)
        keeps = simple and (
            index[:2] in ((full, full), (full,), ())
            or (index[0] is Ellipsis and len(shape) - (len(index) - 1) >= 2)
            or (len(index) >= 2 and index[0] == full and index[1] is Ellipsis)
        )
        if keeps:
            return self.passthrough(node, x, True, "indexing")
        return self.unknown(node, f"indexing {index}")

    def pad(self, node: fx.Node) -> Optional[Labels]:
        x, pad = node.args[0], _arg(node, 1, "pad")
        mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
        shape, labels = _shape(x), self.of(x)
        if shape is None or labels is None or not all(isinstance(p, int) for p in pad or ()):
            return self.unknown(node, "pad with computed amounts")
        position = 2 * (len(shape) - 2)
        before, after = (pad[position], pad[position + 1]) if len(pad) > position + 1 else (0, 0)
        if (before, after) == (0, 0):
            return self.passthrough(node, x, not value, "pad")
        if mode != "constant" or before < 0 or after < 0:
            return self.unknown(node, f"pad of channels in mode {mode!r}")
        head, tail = self.fresh(before, node.name), self.fresh(after, node.name)
        if value:
            self.nonzero.update(head + tail)
        owner = _owner(node)
        self.pads.append((node, owner, self.pad_count.get(owner, 0), position, head, tail))
        self.pad_count[owner] = self.pad_count.get(owner, 0) + 1
        return head + labels + tail

    def reduction(self, node: fx.Node) -> Optional[Labels]:
        x, dims = node.args[0], _arg(node, 1, "dim")
        shape = _shape(x)
        if shape is None or dims is None:
            return self.unknown(node, "reduction over every dimension")
        dims = {d % len(shape) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        if dims & {0, 1}:
            return self.unknown(node, "reduction over the batch or channel dimension")
        out, labels = _shape(node), self.of(x)
        if out is None or labels is None or len(out) < 2 or out[1] != shape[1]:
            return self.unknown(node, "reduction")
        return labels

    def visit_function(self, node: fx.Node) -> Optional[Labels]:
        f = node.target
        x = node.args[0] if node.args else None
        if f in _ZERO_KEEPING_FUNCTIONS:
            return self.passthrough(node, x, True, getattr(f, "__name__", str(f)))
        if f in _NONZERO_FUNCTIONS:
            return self.passthrough(node, x, False, getattr(f, "__name__", str(f)))
        if f is torch.flatten:
            return self.flatten(node, x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if f in _CAT:
            return self.cat(node)
        if f is operator.getitem:
            return self.getitem(node)
        if f is F.pad:
            return self.pad(node)
        if f in _ADD or f in _MUL or f in _DIV:
            kind = "add" if f in _ADD else "mul" if f in _MUL else "div"
            return self.elementwise(node, node.args[:2], kind)
        if f is torch.mean:
            return self.reduction(node)
        if f is F.layer_norm:
            weight, shape = _arg(node, 2, "weight"), _arg(node, 1, "normalized_shape")
            owner = str(weight.target).rpartition(".")[0] if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
            if owner is None or shape is None or len(shape) != 1:
                return self.unknown(node, "layer_norm without a module's own weight")
            return self.layer_norm(node, x, owner, shape[0])
        if f in _SHAPE_QUERIES_F:
            return None
        return self.unknown(node, f"function {getattr(f, '__name__', f)}")

    def visit_method(self, node: fx.Node) -> Optional[Labels]:
        name, x = str(node.target), node.args[0]
        if name in _ZERO_KEEPING_METHODS:
            return self.passthrough(node, x, True, f".{name}()")
        if name in _NONZERO_METHODS:
            return self.passthrough(node, x, False, f".{name}()")
        if name == "flatten":
            return self.flatten(node, x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if name in ("view", "reshape"):
            return self.reshape(node)
        if name == "permute":
            return self.permute(node)
        if name in _ADD_M or name in _MUL_M or name in _DIV_M:
            kind = "add" if name in _ADD_M else "mul" if name in _MUL_M else "div"
            return self.elementwise(node, node.args[:2], kind)
        if name == "mean":
            return self.reduction(node)
        if name in _SHAPE_QUERIES_M:
            return None
        return self.unknown(node, f"method .{name}()")


def _propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor, model: nn.Module) -> None:
    """Shapes of every node from one no-grad, eval-mode pass (BN statistics untouched)."""
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as err:
        raise _input_error(model, example_input, err) from None
    finally:
        for m, mode in modes.items():
            m.training = mode


def _input_error(model: nn.Module, example_input, err: BaseException) -> ConfigError:
    """One line for a traced pass that failed: the example input does not fit the model (the
    model itself rejects it: the usual case), or fx's trace of the model is at fault."""
    from .capture import input_shapes

    shape = input_shapes(example_input)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, example_input)
    except Exception as plain:
        return ConfigError(
            f"example_input of shape {shape} does not fit {type(model).__name__}: pass a batch the model "
            f"accepts (e.g. x[:1] of a training batch). The model raised {model_failure(plain)}"
        )
    finally:
        for m, mode in modes.items():
            m.training = mode
    return ConfigError(
        f"{type(model).__name__} runs on example_input of shape {shape} but its fx trace does not: "
        f"{model_failure(err)}; pass exclude=['<module name>'] for the module whose code fx cannot follow"
    )


def _assemble(t: _Tracker) -> DependencyGraph:
    """Turn atoms into units (joined atoms) and groups (units sharing a producer)."""
    n = len(t.parent)
    roots = [t.find(a) for a in range(n)]
    # groups: union-find over roots, joining the roots of atoms created at the same site
    gparent = list(range(n))

    def gfind(r: int) -> int:
        while gparent[r] != r:
            gparent[r] = gparent[gparent[r]]
            r = gparent[r]
        return r

    first_of_site: dict[str, int] = {}
    for a in range(n):
        r = roots[a]
        s = first_of_site.setdefault(t.site[a], r)
        ra, rb = gfind(s), gfind(r)
        if ra != rb:
            gparent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}  # group root -> unit roots, ordered by smallest atom
    seen: set[int] = set()
    for a in range(n):  # roots are the smallest atom of their unit, so order is by atom id
        r = roots[a]
        if r not in seen:
            seen.add(r)
            members.setdefault(gfind(r), []).append(r)
    unit_of: dict[int, tuple[str, int]] = {}
    names: dict[int, str] = {}
    for g, units in members.items():
        names[g] = t.site[min(units)]
        for u, r in enumerate(units):
            unit_of[r] = (names[g], u)
    owners = {
        key: [unit_of[roots[a]] if a is not None else None for a in atoms]
        for key, atoms in t.index_atoms.items()
    }
    blocked = {roots[a]: why for a, why in sorted(t.blocked.items())}
    nonzero = {roots[a] for a in t.nonzero}
    by_group: dict[str, dict[tuple[str, str], list[list[int]]]] = {names[g]: {} for g in members}
    sizes = {names[g]: len(units) for g, units in members.items()}
    for key, entries in owners.items():
        for i, entry in enumerate(entries):
            if entry is not None:
                tables = by_group[entry[0]]
                if key not in tables:
                    tables[key] = [[] for _ in range(sizes[entry[0]])]
                tables[key][entry[1]].append(i)
    groups, unsafe = [], {}
    for g, units in members.items():
        name = names[g]
        slices = tuple(
            Slice(module, role, tuple(tuple(ix) for ix in per_unit))
            for (module, role), per_unit in by_group[name].items()
        )
        reason = next((blocked[r] for r in units if r in blocked), None)
        if reason is None and not slices:
            reason = "no layer weights belong to these channels"
        groups.append(Group(name, len(units), slices, reason))
        unsafe[name] = frozenset(u for u, r in enumerate(units) if r in nonzero)
    pads = [
        PadSite(
            node.name, owner, ordinal, position,
            tuple(unit_of[roots[a]] for a in head), tuple(unit_of[roots[a]] for a in tail),
        )
        for node, owner, ordinal, position, head, tail in t.pads
    ]
    return DependencyGraph(groups, owners, pads, unsafe)


def build_graph(
    model: nn.Module, example_input: torch.Tensor, exclude: Sequence[str] = ()
) -> DependencyGraph:
    """Trace ``model`` and group its coupled channels.

    ``exclude``: module names or ``fnmatch`` patterns (``"layer1.*"``) whose tensors stay
    untouched; every group that touches them is frozen. Excluding a custom module also
    stops fx from tracing inside it, which is the way around untraceable code.
    """
    if isinstance(exclude, str):
        raise ConfigError(f"exclude must be a list of module names or patterns, got the string {exclude!r}; wrap it: [{exclude!r}]")
    try:
        gm = trace(model, exclude)
    except ConfigError:
        # fx cannot trace it (Python control flow, int() of a shape, ...): run it and record
        from .capture import capture

        gm = capture(model, example_input, exclude, known=_KNOWN_MODULES)
        how = "run"
    else:
        _propagate_shapes(gm, example_input, model)
        how = "fx"
    tracker = _Tracker(gm, exclude)
    tracker.run()
    graph = _assemble(tracker)
    graph.capture = how
    return graph


def build_groups(
    model: nn.Module, example_input: torch.Tensor, exclude: Sequence[str] = ()
) -> list[Group]:
    """The prunable groups of ``model`` (frozen ones are in ``build_graph(...).frozen``)."""
    return build_graph(model, example_input, exclude).prunable
