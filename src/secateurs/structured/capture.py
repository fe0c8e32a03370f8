"""Graph capture by running the model: what ``torch.fx`` cannot trace, execute and record.

``torch.fx`` traces symbolically, so Python control flow on values, ``int()`` of a shape and
the mask and padding arithmetic of real models (Hugging Face MobileNetV2, ResNet,
EfficientNet, ConvNeXt) stop it. Here the model runs for real on the example input under a
``TorchFunctionMode`` that records every torch call as an ``fx`` node, with the real output
shape in ``node.meta["tensor_meta"]`` (as ``ShapeProp`` would put it). Leaf modules (the layer
types the channel tracker understands, and every other built-in ``torch.nn`` module without
children) are recorded as one ``call_module`` node each, through forward hooks, and what
happens inside them is not recorded. The result is the same kind of graph the fx path gives,
so one tracker serves both.

Why not ``torch.export``: it lowers to ATen ops and dissolves modules, so every layer would
need a second set of coupling rules keyed on ATen ops and parameter placeholders; recording
at the torch-function level keeps one rule set. The price is the usual one of tracing by
running (Torch-Pruning's choice too): control flow is specialised to the example input, which
is what channel structure needs.
"""
from __future__ import annotations

import operator
from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..errors import ConfigError
from ..layers import layer_type
from ..outputs import call_model, logits_of, model_failure

__all__ = ["capture"]

# Tensor dunder methods, mapped to the operator functions an fx trace records for them.
_DUNDER = {
    "__add__": operator.add, "__iadd__": operator.iadd, "__sub__": operator.sub, "__isub__": operator.isub,
    "__mul__": operator.mul, "__imul__": operator.imul, "__truediv__": operator.truediv,
    "__itruediv__": operator.itruediv, "__getitem__": operator.getitem,
}
_REFLECTED = {"__radd__": operator.add, "__rmul__": operator.mul}


class Captured:
    """A recorded graph plus the model's modules: what the channel tracker reads."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        self.root = model
        self.graph = graph

    def named_modules(self):
        return self.root.named_modules()


def _is_leaf(module: nn.Module, name: str, exclude: Sequence[str], known: tuple[type, ...]) -> bool:
    from .graph import matches

    if name and matches(name, exclude):
        return True
    if layer_type(module) is not None:
        return True
    if type(module) in known:
        return True
    # a built-in torch.nn module with no children, e.g. LayerNorm, Embedding
    return type(module).__module__.startswith("torch.nn") and not any(True for _ in module.children())


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: fx.Graph, params: dict[int, str]):
        super().__init__()
        self.graph = graph
        self.params = params
        self.nodes: dict[int, fx.Node] = {}
        self.keep: list[Any] = []  # keep recorded tensors alive so their ids stay unique
        self.depth = 0
        self.calls: list[tuple[tuple, dict]] = []  # the arguments of the leaf being called

    def node_of(self, t: torch.Tensor) -> fx.Node | None:
        node = self.nodes.get(id(t))
        if node is None and id(t) in self.params:
            node = self.graph.get_attr(self.params[id(t)])
            node.meta["tensor_meta"] = SimpleNamespace(shape=tuple(t.shape))
            self.nodes[id(t)] = node
            self.keep.append(t)
        return node

    def map(self, value: Any) -> Any:
        def one(v):
            if isinstance(v, torch.Tensor):
                node = self.node_of(v)
                return node if node is not None else _constant(self.graph, v, self)
            return v

        return pytree.tree_map(one, value)

    def bind(self, node: fx.Node, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            node.meta["tensor_meta"] = SimpleNamespace(shape=tuple(out.shape))
            self.nodes[id(out)] = node
            self.keep.append(out)
        elif isinstance(out, (tuple, list)):
            for i, item in enumerate(out):
                if isinstance(item, torch.Tensor):
                    element = self.graph.call_function(operator.getitem, (node, i))
                    self.bind(element, item)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:
            return out
        name = getattr(func, "__name__", "")
        if not _has_tensor(out):
            if name == "__setitem__" or (name.endswith("_") and not name.endswith("__")):
                # an in-place write that returns nothing (x[:, i] = y): the tracker cannot follow
                # it, so record it as an opaque op, which freezes every channel it touches
                self.graph.call_method(name, self.map(tuple(args)), self.map(kwargs))
            return out
        is_method = getattr(torch.Tensor, name, None) is func or (
            getattr(func, "__objclass__", None) in (torch._C.TensorBase, torch.Tensor)
        )
        if is_method and name in _REFLECTED:
            node = self.graph.call_function(_REFLECTED[name], (self.map(args[1]), self.map(args[0])))
        elif is_method and name in _DUNDER:
            node = self.graph.call_function(_DUNDER[name], self.map(tuple(args)), self.map(kwargs))
        elif is_method:
            node = self.graph.call_method(name, self.map(tuple(args)), self.map(kwargs))
        else:
            node = self.graph.call_function(func, self.map(tuple(args)), self.map(kwargs))
        self.bind(node, out)
        return out


def _has_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value))


def _constant(graph: fx.Graph, t: torch.Tensor, recorder: _Recorder) -> fx.Node:
    """A tensor made outside the recording (a buffer, a literal): an opaque source node."""
    node = graph.call_function(torch.Tensor.clone, (), {}, name="constant")
    node.meta["tensor_meta"] = SimpleNamespace(shape=tuple(t.shape))
    recorder.nodes[id(t)] = node
    recorder.keep.append(t)
    return node


def input_shapes(inputs: Any) -> Any:
    """The shape of a tensor input, or the shapes of the tensors in a tuple / mapping input."""
    if isinstance(inputs, torch.Tensor):
        return tuple(inputs.shape)
    shapes = [tuple(t.shape) for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    return shapes[0] if len(shapes) == 1 else shapes


def capture(model: nn.Module, example_input: Any, exclude: Sequence[str] = (), known: tuple[type, ...] = ()) -> Captured:
    """Record ``model``'s forward on ``example_input`` (eval mode, no grad) as an fx graph."""
    graph = fx.Graph()
    params = {id(p): n for n, p in model.named_parameters()}
    params.update({id(b): n for n, b in model.named_buffers()})
    recorder = _Recorder(graph, params)
    inputs = example_input
    for i, leaf in enumerate(pytree.tree_leaves(inputs)):
        if isinstance(leaf, torch.Tensor):
            node = graph.placeholder(f"input_{i}")
            recorder.bind(node, leaf)
    handles = []

    def pre(module_name):
        def hook(module, args, kwargs):
            if recorder.depth == 0:
                recorder.calls.append((args, kwargs))
            recorder.depth += 1
        return hook

    def post(module_name):
        def hook(module, args, kwargs, output):
            recorder.depth -= 1
            if recorder.depth == 0 and _has_tensor(output):
                call_args, call_kwargs = recorder.calls.pop() if recorder.calls else (args, kwargs)
                node = graph.call_module(module_name, recorder.map(tuple(call_args)), recorder.map(dict(call_kwargs)))
                recorder.bind(node, output)
        return hook

    for name, module in model.named_modules():
        if name and _is_leaf(module, name, exclude, known):
            handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post(name), with_kwargs=True))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), recorder:
            output = call_model(model, inputs)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(
            f"example_input of shape {input_shapes(inputs)} does not fit {type(model).__name__}: pass a batch the "
            f"model accepts (e.g. x[:1] of a training batch). The model raised {model_failure(err)}"
        ) from None
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        recorder.depth = 0
    try:
        result = logits_of(output)
    except ConfigError:
        result = output
    graph.output(recorder.map(result))
    return Captured(model, graph)
