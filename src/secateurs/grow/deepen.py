"""Deepening an MLP without changing what it computes: insert an identity layer.

In a ReLU MLP the input of every layer after a hidden ReLU is non-negative. A new
``Linear(w, w)`` with the identity as weight and a zero bias, followed by a ReLU, maps such
an ``h >= 0`` to ``relu(I h + 0) = h``: the network's function is unchanged, exactly in
floating point (each output is ``1 * h_i`` plus exact zeros), not only up to rounding --
except where a backend rounds matmul inputs (TF32 on CUDA), which the optional output check
reports. The new layer then trains like any other (Net2DeeperNet, Chen et al., 2016, uses
the same identity initialisation).

Depth is never reduced here. Removing a hidden layer ``relu(W2 relu(W1 h + b1) + b2)`` can
only be made exact when that layer is linear on the data, so a removal would change the
function and need retraining; the grow-and-prune search shrinks capacity by pruning units
instead (:mod:`secateurs.grow.heuristic`).

The functions work on any model whose Linear layers all sit in one ``nn.Sequential`` of the
form ``[Flatten,] Linear, ReLU, ..., Linear`` (as :class:`secateurs.models.MLP` builds it), so
a deepened model has exactly the state-dict layout of a freshly built MLP of the new widths.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import ConfigError, GrowthError
from ..validate import check_int

__all__ = ["MLPLayout", "mlp_layout", "insert_identity_layer"]


@dataclass(frozen=True)
class MLPLayout:
    """Where an MLP's layers are: ``sequential`` (module path, "" for the model itself),
    the indices of its Linear layers inside it, and the hidden Linear layers' module names
    (in order) with their widths."""

    sequential: str
    linear_positions: tuple[int, ...]
    hidden: tuple[str, ...]
    in_features: int
    widths: tuple[int, ...]
    out_features: int

    @property
    def depth(self) -> int:
        """The number of hidden layers."""
        return len(self.widths)


def _describe(seq: nn.Sequential) -> str:
    return ", ".join(type(m).__name__ for m in seq)


def mlp_layout(model: nn.Module) -> MLPLayout:
    """Find and check the MLP structure of ``model``; a clear error for anything else."""
    linears = {id(m) for m in model.modules() if isinstance(m, nn.Linear)}
    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.Sequential) and linears and linears <= {id(c) for c in m.children()}
    ]
    if not candidates:
        raise ConfigError(
            f"{type(model).__name__} is not an MLP with all its Linear layers in one nn.Sequential; "
            "grow-and-prune needs [Flatten,] Linear, ReLU, ..., Linear (build it with secateurs.models.MLP)"
        )
    path, seq = candidates[0]
    body = list(seq)
    start = 1 if body and isinstance(body[0], nn.Flatten) else 0
    pattern = body[start:]
    ok = len(pattern) >= 3 and len(pattern) % 2 == 1 and all(
        isinstance(m, nn.Linear if i % 2 == 0 else nn.ReLU) for i, m in enumerate(pattern)
    )
    if ok:
        ok = all(m.bias is not None for m in pattern[::2])
    if not ok:
        raise ConfigError(
            f"{path or type(model).__name__} holds [{_describe(seq)}]; grow-and-prune needs at least one hidden "
            "layer in the pattern [Flatten,] Linear, ReLU, ..., Linear with biases (secateurs.models.MLP)"
        )
    positions = tuple(range(start, len(body), 2))
    prefix = f"{path}." if path else ""
    hidden = tuple(f"{prefix}{p}" for p in positions[:-1])
    return MLPLayout(
        sequential=path, linear_positions=positions, hidden=hidden,
        in_features=body[positions[0]].in_features,
        widths=tuple(body[p].out_features for p in positions[:-1]),
        out_features=body[positions[-1]].out_features,
    )


def _identity_linear(like: nn.Linear) -> nn.Linear:
    """``Linear(w, w)`` with weight I and bias 0, built without touching the global RNG."""
    w = like.out_features
    new = nn.Linear(w, w, device="meta", dtype=like.weight.dtype)
    new.weight = nn.Parameter(torch.eye(w, dtype=like.weight.dtype, device=like.weight.device))
    new.bias = nn.Parameter(torch.zeros(w, dtype=like.weight.dtype, device=like.weight.device))
    return new.train(like.training)


@torch.no_grad()
def insert_identity_layer(
    model: nn.Module, after: int, *, example_input: Optional[torch.Tensor] = None, atol: float = 0.0
) -> nn.Module:
    """A deeper copy of ``model``: an identity ``Linear(w, w)`` + ReLU inserted right after
    hidden layer ``after`` (0-based) and its ReLU; ``w`` is that layer's width. The original
    is untouched.

    With ``example_input`` the outputs of both networks are compared (eval mode) and a
    difference above ``atol`` times the output's magnitude raises :class:`GrowthError`; on
    CPU in float32 the difference is exactly 0."""
    layout = mlp_layout(model)
    check_int(
        after, "after", minimum=0, below=layout.depth,
        hint=f"the index of a hidden layer, 0..{layout.depth - 1}; "
        "a layer can only be inserted behind a hidden ReLU (its input must be non-negative)",
    )
    new = copy.deepcopy(model)
    seq = new.get_submodule(layout.sequential) if layout.sequential else new
    body = list(seq)
    pos = layout.linear_positions[after]
    relu = body[pos + 1]
    body[pos + 2:pos + 2] = [_identity_linear(body[pos]), nn.ReLU(inplace=relu.inplace)]
    for name in list(seq._modules):
        del seq._modules[name]
    for i, module in enumerate(body):
        seq.add_module(str(i), module)
    if example_input is not None:
        before, after_out = _eval_output(model, example_input), _eval_output(new, example_input)
        err = float((after_out - before).abs().max())
        if not err <= atol * max(1.0, float(before.abs().max())):
            raise GrowthError(
                f"inserting an identity layer after hidden layer {after} changed the output by {err:.3g}; "
                "is TF32 matmul enabled (torch.backends.cuda.matmul.allow_tf32)? Pass a tolerance via atol"
            )
    return new


def _eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(x).detach().clone()
    finally:
        model.train(was_training)
