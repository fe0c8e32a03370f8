"""Wanda and SparseGPT as their authors' reference code computes them, for side-by-side checks.

We cannot vendor or download the reference repositories (``locuslab/wanda``,
``IST-DASLab/sparsegpt``), so this module re-states their algorithms in *their* formulation,
written from reading their code, independent of ``secateurs.methods.oneshot``:

- statistics in float32 as running means over calibration *samples*: Wanda's per-input
  ``scaler_row`` (mean of squared input norms), SparseGPT's ``H`` (the mean of ``2 x x^T``);
- all layers of a block see the block's inputs before any of them is pruned; then the pruned
  block's outputs become the next block's inputs;
- Wanda: per output row, a stable sort of ``|W| * sqrt(scaler_row)`` prunes the first
  ``int(cols * sparsity)``; N:M prunes the ``m - n`` smallest of every ``m`` inputs (topk);
- SparseGPT: dead inputs zeroed, dampening 1% of the mean diagonal, the upper Cholesky factor
  of ``H^-1``, blocks of 128 columns; unstructured masks by a per-block threshold (the
  ``int(numel * sparsity)``-th smallest ``w^2 / d^2``, pruning everything ``<=`` it), N:M by
  topk every ``m`` columns; column-wise error feedback and the lazy update of later blocks.

Only the plumbing that is not part of either algorithm (finding the blocks, capturing the first
block's inputs) comes from secateurs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from secateurs.layers import layer_type
from secateurs.methods.oneshot import _block_inputs, _layers_of, _output_hidden, _to, find_blocks


def _rows(weight: torch.Tensor, axis: int) -> torch.Tensor:
    return weight if axis == 0 else weight.T


class _Scaler:
    """Wanda's running mean of squared input norms, per sample, in float32."""

    def __init__(self, cols: int):
        self.scaler, self.n = torch.zeros(cols), 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        batch = 1  # the reference feeds one sample per call
        self.scaler *= self.n / (self.n + batch)
        self.n += batch
        self.scaler += (x * x).sum(0) / self.n


class _Hessian:
    """SparseGPT's running mean of ``2 x x^T`` over samples, in float32."""

    def __init__(self, cols: int):
        self.h, self.n = torch.zeros(cols, cols), 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.h *= self.n / (self.n + 1)
        self.n += 1
        x = math.sqrt(2 / self.n) * x
        self.h += x.T @ x


def _wanda_mask(w: torch.Tensor, scaler: torch.Tensor, sparsity: float, nm) -> torch.Tensor:
    metric = w.abs().float() * scaler.sqrt()[None, :]
    pruned = torch.zeros_like(metric, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        for i in range(0, metric.shape[1], m):
            pruned.scatter_(1, i + torch.topk(metric[:, i:i + m], m - n, dim=1, largest=False)[1], True)
    else:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        pruned.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
    return ~pruned


def _sparsegpt(w: torch.Tensor, h: torch.Tensor, sparsity: float, nm, blocksize=128, percdamp=0.01):
    """Returns (new weight, kept mask) for rows = outputs."""
    w = w.clone().float()
    h = h.clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(h))
    h[range(cols), range(cols)] += damp
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, q1, err1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), torch.zeros_like(w[:, i1:i2])
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if nm is None:
            tmp = w1 ** 2 / d[None, :] ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = w1[:, i]
            if nm is not None and i % nm[1] == 0:
                tmp = w1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]][None, :] ** 2
                mask1.scatter_(1, i + torch.topk(tmp, nm[1] - nm[0], dim=1, largest=False)[1], True)
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            e = (col - q) / d[i]
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, ~pruned


@torch.no_grad()
def reference_prune(model: nn.Module, samples, method: str, sparsity: float = 0.5, nm=None) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place as the reference code would; returns the kept masks by layer."""
    model.eval()
    path, stack = find_blocks(model)
    inputs = _block_inputs(model, stack, list(samples))
    inps = inputs.hidden
    masks = {}
    for b, block in enumerate(stack):
        args, kwargs = inputs.args[b], inputs.kwargs[b]
        layers = _layers_of(block)
        stats, handles = {}, []
        for name, layer in layers.items():
            kind = layer_type(layer)
            cols = _rows(getattr(layer, kind.param), kind.output_axis).shape[1]
            stats[name] = _Scaler(cols) if method == "wanda" else _Hessian(cols)
            handles.append(layer.register_forward_hook(lambda mod, i, o, s=stats[name]: s.add(i[0])))
        for x, a, k in zip(inps, args, kwargs):
            block(x, *a, **_to(k, x.device))
        for h in handles:
            h.remove()
        for name, layer in layers.items():
            kind = layer_type(layer)
            weight = getattr(layer, kind.param)
            w = _rows(weight.detach(), kind.output_axis)
            if method == "wanda":
                keep = _wanda_mask(w, stats[name].scaler, sparsity, nm)
                new = w * keep
            else:
                new, keep = _sparsegpt(w, stats[name].h, sparsity, nm)
            weight.copy_(_rows(new, kind.output_axis).to(weight.dtype))
            masks[f"{path}.{b}.{name}" if name else f"{path}.{b}"] = _rows(keep, kind.output_axis).clone()
        inps = [_output_hidden(block(x, *a, **_to(k, x.device))) for x, a, k in zip(inps, args, kwargs)]
    return masks
