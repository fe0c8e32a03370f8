"""FLOPs accounting for sparse networks: inference and total training cost as fractions of dense.

This is the accounting of RigL (Evci et al. 2020, appendix H) that GraNet (Liu et al. 2021,
Table 3) reuses to report "training FLOPs" and "test FLOPs" relative to the dense model:

* every conv / linear layer ``l`` costs ``macs_l`` multiply-accumulates per example when dense
  and ``d_l * macs_l`` at density ``d_l`` (an unstructured sparse kernel skips zero weights);
* a training step costs three forward passes, ``3 * f_S`` with ``f_S = sum_l d_l * macs_l``
  (forward, gradient w.r.t. the inputs, gradient w.r.t. the weights);
* a step whose mask update reads the *dense* weight gradient (RigL / GraNet regrowth) costs
  ``2 * f_S + f_D`` instead, ``f_D = sum_l macs_l``.

Bias adds, batch norm, activations and pooling are left out, as RigL does: they are a few
percent of a conv net's cost and the same in the dense and the sparse model. One MAC counts as
one unit; the fractions do not depend on that factor of 2.

Densities are per-layer fractions of weights kept, keyed by parameter name as in
``model.named_parameters()``; from a :class:`secateurs.masks.Masks` they are
``{n: 1 - s for n, s in masks.layer_sparsity().items()}``.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import fan_in, layer_type, registered_layers
from ..masks import unwrap_model
from ..outputs import call_model, first_tensor
from ..validate import check_int, check_number

__all__ = ["layer_macs", "inference_flops", "training_flops", "flops_report"]

#: Module types whose multiply-accumulates are counted: every registered layer type
#: (:func:`secateurs.layers.register_layer`), i.e. Linear, Conv1d/2d/3d, transformers' Conv1D
#: and what users register.


def _preview(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _weight_name(module_name: str, module: nn.Module, param_names: Mapping[int, str]) -> str:
    # Tied weights appear once in named_parameters(); key them by that canonical name so the
    # result lines up with masks and densities.
    param = layer_type(module).param
    weight = getattr(module, param, None)
    if isinstance(weight, torch.Tensor) and id(weight) in param_names:
        return param_names[id(weight)]
    return f"{module_name}.{param}" if module_name else param


def _module_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one call, summed over the batch: every output element costs
    one MAC per input of its unit (the weight's fan-in, a grouped conv's included), whatever
    the weight's layout."""
    kind = layer_type(module)
    weight = getattr(module, kind.param)
    return output.numel() * fan_in(weight.shape, kind.output_axis)


def layer_macs(
    model: nn.Module,
    example_input: torch.Tensor,
    names: Iterable[str] | None = None,
) -> dict[str, int]:
    """Multiply-accumulates per example of every registered layer (Linear, Conv1d/2d/3d,
    transformers' ``Conv1D``, and types registered with :func:`secateurs.layers.register_layer`).

    Measured rather than derived from shapes, so any spatial size, stride, padding, grouping
    or N-D linear input is handled: one forward pass of ``example_input`` (batch on dim 0)
    under ``torch.no_grad()`` in eval mode, with temporary forward hooks that are always
    removed; the train/eval mode of every submodule is restored afterwards. Wrappers (DDP,
    DataParallel, ``torch.compile``) are unwrapped so keys match ``model.named_parameters()``
    of the plain model, e.g. ``"features.0.weight"``.

    Every layer: output elements x the weight's fan-in (conv: ``in_channels / groups`` x kernel
    volume; Linear and Conv1D: ``in_features``) (RigL, Evci et al. 2020, appendix H). Bias adds, batch norm, activations
    and pooling are deliberately not counted, as in RigL. A layer called twice counts twice;
    a layer not reached by the forward pass counts 0. ``names`` restricts the result to those
    weight names.
    """
    model = unwrap_model(model)
    try:
        first = first_tensor(example_input)
    except ConfigError:
        first = None
    if first is None or first.dim() == 0 or first.shape[0] < 1:
        raise ConfigError(
            "layer_macs needs example_input to be a tensor (or a tuple / mapping of tensors, e.g. "
            "{'input_ids': ...}) with the batch on dim 0 and at least one example, e.g. torch.zeros(1, 3, 32, 32)"
        )
    param_names = {id(p): n for n, p in model.named_parameters()}
    layers = {
        module: _weight_name(name, module, param_names)
        for name, module in model.named_modules()
        if layer_type(module) is not None and isinstance(getattr(module, layer_type(module).param, None), torch.Tensor)
    }
    valid = list(dict.fromkeys(layers.values()))
    if names is not None:
        wanted = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in wanted if n not in valid]
        if unknown:
            raise ConfigError(
                f"layer_macs: {_preview(unknown)} is not the weight of a registered layer "
                f"({', '.join(registered_layers())}) of this model; use one of {_preview(valid) or 'nothing (the model has none)'}"
            )
    else:
        wanted = valid

    totals = dict.fromkeys(valid, 0)

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        totals[layers[module]] += _module_macs(module, output)

    first_param = next(model.parameters(), None)
    if first_param is not None:
        example_input = _to(example_input, first_param.device)
    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for module in layers:
            handles.append(module.register_forward_hook(hook))
        model.eval()
        with torch.no_grad():
            call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training

    batch = first.shape[0]
    return {n: totals[n] // batch for n in wanted}


def _to(inputs, device):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


def _check_macs(macs: Mapping[str, int]) -> int:
    for name, value in macs.items():
        check_int(value, f"macs[{name!r}]", minimum=0, numpy=True, hint="pass the dict returned by layer_macs(model, example_input)")
    total = int(sum(int(v) for v in macs.values()))
    if total <= 0:
        raise ConfigError(
            "macs sum to 0, so no fraction of dense can be computed; pass layer_macs() of a "
            "model that has Conv or Linear layers reached by its forward pass"
        )
    return total


def _check_densities(densities: Mapping[str, float], macs: Mapping[str, int], where: str) -> None:
    for name, d in densities.items():
        if name not in macs:
            raise ConfigError(
                f"{where}: layer {name!r} is not in macs; use one of {_preview(macs)} "
                "(names as in model.named_parameters())"
            )
        check_number(
            d, f"{where}: the density of {name!r}", minimum=0.0, maximum=1.0, numpy=True,
            hint="a density is the fraction of weights kept (density = 1 - sparsity)",
        )


def _sparse_macs(macs: Mapping[str, int], densities: Mapping[str, float]) -> float:
    return float(sum(float(densities.get(n, 1.0)) * int(m) for n, m in macs.items()))


def inference_flops(macs: Mapping[str, int], densities: Mapping[str, float]) -> dict:
    """Inference cost of the sparse model per example, and its fraction of dense.

    The "test FLOPs" of GraNet (Liu et al. 2021) Table 3 and RigL (Evci et al. 2020): each
    layer's MACs scaled by its density. Layers missing from ``densities`` count as dense.
    Returns ``{"dense": int, "sparse": float, "fraction": float}``.
    """
    dense = _check_macs(macs)
    _check_densities(densities, macs, "inference_flops")
    sparse = _sparse_macs(macs, densities)
    return {"dense": int(dense), "sparse": sparse, "fraction": sparse / dense}


def _check_count(value: object, what: str) -> int:
    return check_int(value, what, minimum=1)


def training_flops(
    macs: Mapping[str, int],
    events: Sequence[Mapping],
    total_steps: int,
    batch_size: int = 1,
    initial_density: Mapping[str, float] | None = None,
) -> dict:
    """Total training cost of a sparse-training run, and its fraction of dense training.

    The "training FLOPs" of GraNet (Liu et al. 2021) Table 3, with the cost model of RigL
    (Evci et al. 2020, appendix H): a step at densities ``d`` costs ``3 * f_S``, a step whose
    update reads a dense weight gradient ``2 * f_S + f_D``; dense training ``3 * f_D``.

    ``events`` (sorted by ``"step"``) are mask updates ``{"step": s, "density": {name: d},
    "dense_gradient": bool}``: the update happens after optimizer step ``s``, so its densities
    hold for steps ``s+1 .. total_steps`` (``s = 0``: before training, e.g. a sparse init).
    Layers an event leaves out keep their density; before the first event densities are
    ``initial_density`` (default dense). With ``dense_gradient`` the step ``s >= 1`` itself is
    charged ``2 * f_S + f_D`` at the densities in force during it; a step is charged so at most
    once even if several events share it. Integrates the piecewise-constant density, so the
    cost is O(#events + #layers), independent of ``total_steps``.

    Returns ``{"dense", "sparse", "fraction", "dense_gradient_steps"}``.
    """
    f_dense = _check_macs(macs)
    total_steps = _check_count(total_steps, "training_flops: total_steps")
    batch_size = _check_count(batch_size, "training_flops: batch_size")
    density = {n: 1.0 for n in macs}
    if initial_density is not None:
        _check_densities(initial_density, macs, "training_flops initial_density")
        density.update({n: float(d) for n, d in initial_density.items()})
    f_sparse = _sparse_macs(macs, density)

    cost = 0.0  # per example
    done = 0  # optimizer steps integrated so far
    f_during = f_sparse  # f_S in force during step `done`
    charged = -1  # last step charged for a dense gradient
    dense_gradient_steps = 0
    for i, event in enumerate(events):
        where = f"training_flops events[{i}]"
        if not isinstance(event, Mapping):
            raise ConfigError(f"{where} is {event!r}; each event must be a dict with a 'step' key")
        step = event.get("step")
        check_int(step, f"{where}: 'step'", hint="each event needs the integer optimizer step it happens at")
        if not 0 <= step <= total_steps:
            raise ConfigError(
                f"{where}: step {step} is outside [0, total_steps={total_steps}]; use 0 for an "
                "update before training and total_steps for one after the last step"
            )
        if step < done:
            raise ConfigError(
                f"{where}: step {step} comes after an event at step {done}; sort events by 'step'"
            )
        new_density = event.get("density") or {}
        if not isinstance(new_density, Mapping):
            raise ConfigError(f"{where}: 'density' is {new_density!r}; it must be a dict {{name: density}}")
        _check_densities(new_density, macs, where)

        if step > done:
            cost += 3.0 * f_sparse * (step - done)
            done = step
            f_during = f_sparse
        if event.get("dense_gradient", False) and step >= 1 and step != charged:
            cost += f_dense - f_during
            charged = step
            dense_gradient_steps += 1
        for name, d in new_density.items():
            f_sparse += (float(d) - density[name]) * int(macs[name])
            density[name] = float(d)
    cost += 3.0 * f_sparse * (total_steps - done)

    dense_cost = 3 * f_dense * total_steps * batch_size
    sparse_cost = cost * batch_size
    return {
        "dense": int(dense_cost),
        "sparse": float(sparse_cost),
        "fraction": float(sparse_cost / dense_cost),
        "dense_gradient_steps": dense_gradient_steps,
    }


def _final_density(events: Sequence[Mapping], initial: Mapping[str, float] | None) -> dict[str, float]:
    density = dict(initial or {})
    for event in events:
        if isinstance(event, Mapping) and isinstance(event.get("density"), Mapping):
            density.update(event["density"])
    return density


def flops_report(
    macs: Mapping[str, int],
    events: Sequence[Mapping],
    total_steps: int,
    final_density: Mapping[str, float] | None,
    batch_size: int = 1,
    *,
    initial_density: Mapping[str, float] | None = None,
) -> dict:
    """Inference and training FLOPs in one JSON-serialisable dict, as GraNet Table 3 reports them.

    ``final_density`` are the densities of the final model; ``None`` takes the ones in force
    after the last event. Returns ``{"inference": inference_flops(...), "training":
    training_flops(...)}``.
    """
    if final_density is None:
        final_density = _final_density(events, initial_density)
    return {
        "inference": inference_flops(macs, final_density),
        "training": training_flops(macs, events, total_steps, batch_size, initial_density),
    }
